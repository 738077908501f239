/* The shared-memory path's two data modes (through the slots, or single copy from the peers'
 * buffers) must be chosen alike on every rank. Ranks whose settings differ:
 *   1. MC_SHM_CMA_MIN differs (1 on rank 0, 2 MiB on the others): they agree on the slots,
 *      and every result is right (it was wrong data with success before the agreement);
 *   2. MC_ALGO differs (rank 0 single copy, the others the slots): the operation fails with
 *      MC_ERR_MISMATCH naming the mode on every rank, never with wrong data.
 * Usage: test_shm_modes <ranks> */
#include <string.h>

#include "harness.h"

static int scenario;

static void set_env(int rank, void *arg) {
  (void)arg;
  if (scenario == 1)
    setenv("MC_SHM_CMA_MIN", rank == 0 ? "1" : "2097152", 1);
  else
    setenv("MC_ALGO", rank == 0 ? "allreduce=shm_cma" : "allreduce=shm_slots", 1);
}

/* allreduce of n floats, every rank r contributing r + 1 + it; 0 if right */
static int allreduce_checked(mc_comm_t *comm, float *in, float *out, size_t n, int it,
                             mc_status_t *st) {
  int me = mc_comm_rank(comm), size = mc_comm_size(comm);
  for (size_t i = 0; i < n; i++)
    in[i] = (float)(me + 1 + it);
  memset(out, 0, n * sizeof *out);
  mc_request_t *req = NULL;
  *st = mc_allreduce(comm, in, out, n, MC_FLOAT32, MC_SUM, &req);
  CHECK(*st == MC_OK, "allreduce: %s", mc_last_error());
  *st = mc_wait(req, 60000);
  if (*st != MC_OK) {
    CHECK(*st == MC_ERR_MISMATCH, "rank %d: %s: %s", me, mc_status_str(*st), mc_request_error(req));
    CHECK(strstr(mc_request_error(req), "single copy") && strstr(mc_request_error(req), "slots"),
          "rank %d: mismatch message does not name the modes: %s", me, mc_request_error(req));
    mc_request_free(req);
    return 0;
  }
  mc_request_free(req);
  float want = (float)(size * (size + 1) / 2 + size * it);
  for (size_t i = 0; i < n; i++)
    CHECK(out[i] == want, "rank %d: allreduce %d of %zu: out[%zu] = %g, want %g", me, it, n, i,
          out[i], want);
  return 0;
}

static int body(mc_comm_t *comm, void *arg) {
  (void)arg;
  const size_t big = (size_t)1 << 20; /* 4 MiB of floats */
  float *in = malloc(big * sizeof *in), *out = malloc(big * sizeof *out);
  CHECK(in && out, "out of memory");
  size_t sizes[] = {big, big, big / 4, big / 4, 1000};
  int failed = 0;
  for (int it = 0; it < 5 && !failed; it++) {
    mc_status_t st;
    if (allreduce_checked(comm, in, out, sizes[it], it, &st))
      failed = 1;
    else if (st != MC_OK) {
      /* only the scenario with different MC_ALGO may fail, and with a mismatch at once */
      CHECK(scenario == 2, "rank %d: allreduce %d failed", mc_comm_rank(comm), it);
      break;
    } else
      CHECK(scenario == 1, "rank %d: allreduce %d with different modes succeeded",
            mc_comm_rank(comm), it);
  }
  free(in);
  free(out);
  return failed;
}

int main(int argc, char **argv) {
  int ranks = argc > 1 ? atoi(argv[1]) : 2;
  mc_harness_on_fork(set_env, NULL);
  for (scenario = 1; scenario <= 2; scenario++) {
    if (mc_harness_run(ranks, body, NULL, 120)) {
      fprintf(stderr, "test_shm_modes: scenario %d failed\n", scenario);
      return 1;
    }
    printf("test_shm_modes: scenario %d passed (%d ranks)\n", scenario, ranks);
  }
  return 0;
}
