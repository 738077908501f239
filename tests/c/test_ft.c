/* Fault tolerance over real processes: ranks are killed (SIGKILL), stopped (SIGSTOP) or made to
 * die inside the agreement (MC_FAULT); survivors must fail fast with the right error, agree,
 * shrink and then compute bit-exact results on the survivors.
 * Usage: test_ft [ranks] | --bench RANKS TRIALS [--cold] | --soak RANKS SECONDS BUSY_PROCESSES
 *        | --overhead RANKS ROUNDS */
#define _GNU_SOURCE
#include <dirent.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "internal.h" /* mc_comm_standby_ready */

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* shared between the ranks of one scenario */
typedef struct {
  int64_t killed_at; /* when the (first) victim died */
  pid_t pid[64];
  int64_t detect_ns[64]; /* per survivor: kill -> its failed operation returned */
  int64_t shrink_ns[64];
  int64_t recover_ns[64]; /* kill -> first correct allreduce on the shrunk communicator */
} board_t;

static board_t *board(void) { return mc_harness_scratch(); }

static void die_now(int rank) {
  mc_harness_expect_death(rank);
  __atomic_store_n(&board()->killed_at, now_ns(), __ATOMIC_SEQ_CST);
  kill(getpid(), SIGKILL);
}

static const char *status(mc_status_t st) { return mc_status_str(st); }

/* Allreduce of (lineage rank + 1) * (i + 1) over `c`; checks the sum over the expected members. */
static mc_status_t sum_check(mc_comm_t *c, int lineage_rank, const int *members, int n,
                             int64_t *got_out) {
  int64_t v[257];
  for (int i = 0; i < 257; i++)
    v[i] = (int64_t)(lineage_rank + 1) * (i + 1);
  mc_request_t *req;
  mc_status_t st = mc_allreduce(c, v, v, 257, MC_INT64, MC_SUM, &req);
  if (st != MC_OK)
    return st;
  st = mc_wait(req, 30000);
  if (st == MC_OK) {
    int64_t members_sum = 0;
    for (int k = 0; k < n; k++)
      members_sum += members[k] + 1;
    for (int i = 0; i < 257; i++)
      if (v[i] != members_sum * (i + 1)) {
        fprintf(stderr, "lineage rank %d: element %d is %lld, expected %lld\n", lineage_rank, i,
                (long long)v[i], (long long)(members_sum * (i + 1)));
        st = MC_ERR_INTERNAL;
        break;
      }
  } else if (got_out == NULL) {
    fprintf(stderr, "lineage rank %d: %s\n", lineage_rank, mc_request_error(req));
  }
  mc_request_free(req);
  return st;
}

/* Runs collectives (allreduces unless loop_op says otherwise) until one fails (the failure
 * must name a dead rank and the operation), returns when. */
static size_t loop_count = 16; /* elements per rank of until_failure's operations */
static mc_op_kind_t loop_op = MC_OP_ALLREDUCE;

static int until_failure(mc_comm_t *c, int me, const int *victims, int nvictims, int die_at) {
  const size_t all = loop_count * (size_t)mc_comm_size(c);
  int64_t *v = calloc(all, sizeof *v), *out = calloc(all, sizeof *out);
  const char *name = loop_op == MC_OP_ALLGATHER        ? "allgather"
                     : loop_op == MC_OP_REDUCE_SCATTER ? "reduce_scatter"
                                                       : "allreduce";
  for (int it = 0; it < 100000; it++) {
    v[0] = me;
    mc_request_t *req;
    mc_status_t st = loop_op == MC_OP_ALLGATHER
                         ? mc_allgather(c, v, out, loop_count, MC_INT64, &req)
                     : loop_op == MC_OP_REDUCE_SCATTER
                         ? mc_reduce_scatter(c, v, out, loop_count, MC_INT64, MC_SUM, &req)
                         : mc_allreduce(c, v, v, loop_count, MC_INT64, MC_SUM, &req);
    CHECK(st == MC_OK, "rank %d: %s refused: %s", me, name, mc_last_error());
    for (int v = 0; v < nvictims && it == die_at; v++)
      if (me == victims[v])
        die_now(me); /* its operation is in flight on the others */
    st = mc_wait(req, 30000);
    if (st != MC_OK) {
      int64_t t = now_ns();
      const char *msg = mc_request_error(req);
      CHECK(st == MC_ERR_PEER_FAILED || st == MC_ERR_REVOKED, "rank %d: %s: %s", me, status(st),
            msg);
      CHECK(strstr(msg, "failed") && strstr(msg, name), "rank %d: message '%s'", me, msg);
      board()->detect_ns[me] = t - __atomic_load_n(&board()->killed_at, __ATOMIC_SEQ_CST);
      mc_request_free(req);
      free(v), free(out);
      return 0;
    }
    mc_request_free(req);
  }
  CHECK(0, "rank %d: no failure seen", me);
}

/* --bench (unless --cold): the failure comes once the communicator is fully set up, its
 * standby endpoint pre-connected, as in a job that has been running for a while. */
static bool warm_first;

static int wait_standby(mc_comm_t *c) {
  for (int64_t ready = 0; !ready;) {
    ready = mc_comm_standby_ready(c);
    mc_request_t *req;
    RUN_OK(req, mc_allreduce(c, &ready, &ready, 1, MC_INT64, MC_MIN, &req));
  }
  return 0;
}

/* Shrinks until an allreduce on the result is correct; checks the survivors' renumbering. */
static int shrink_and_verify(mc_comm_t **cp, int me, const int *survivors, int n) {
  mc_comm_t *c = *cp;
  int64_t t0 = now_ns();
  for (int round = 0; round < 4; round++) {
    mc_comm_t *nc;
    mc_status_t st = mc_comm_shrink(c, NULL, 0, &nc);
    CHECK(st == MC_OK, "rank %d: shrink: %s: %s", me, status(st), mc_last_error());
    if (round == 0)
      board()->shrink_ns[me] = now_ns() - t0;
    if (c != *cp)
      mc_comm_destroy(c);
    c = nc;
    /* the survivors of this round: all members not known failed */
    if (mc_comm_size(c) != n)
      continue; /* someone died during the shrink: the new communicator is revoked */
    int expected_rank = -1;
    for (int k = 0; k < n; k++)
      if (survivors[k] == me)
        expected_rank = k;
    CHECK(mc_comm_rank(c) == expected_rank, "rank %d: new rank %d, expected %d", me,
          mc_comm_rank(c), expected_rank);
    st = sum_check(c, me, survivors, n, NULL);
    CHECK(st == MC_OK, "rank %d: allreduce after shrink: %s", me, status(st));
    board()->recover_ns[me] = now_ns() - __atomic_load_n(&board()->killed_at, __ATOMIC_SEQ_CST);
    *cp = c;
    return 0;
  }
  CHECK(0, "rank %d: no working communicator after 4 shrinks (size %d, want %d)", me,
        mc_comm_size(c), n);
}

static void report(const char *what, int n, const int *survivors, int ns) {
  int64_t worst_detect = 0, worst_shrink = 0, worst_recover = 0;
  for (int k = 0; k < ns; k++) {
    board_t *b = board();
    int r = survivors[k];
    worst_detect = b->detect_ns[r] > worst_detect ? b->detect_ns[r] : worst_detect;
    worst_shrink = b->shrink_ns[r] > worst_shrink ? b->shrink_ns[r] : worst_shrink;
    worst_recover = b->recover_ns[r] > worst_recover ? b->recover_ns[r] : worst_recover;
  }
  (void)n;
  printf("  %s: slowest survivor: detected %.1f ms, shrink %.1f ms, failure -> correct allreduce "
         "%.1f ms\n",
         what, worst_detect / 1e6, worst_shrink / 1e6, worst_recover / 1e6);
}

static int survivors_without(int n, const int *dead, int ndead, int *out) {
  int ns = 0;
  for (int r = 0; r < n; r++) {
    bool gone = false;
    for (int d = 0; d < ndead; d++)
      gone |= dead[d] == r;
    if (!gone)
      out[ns++] = r;
  }
  return ns;
}

/* ---- scenarios ---- */

typedef struct {
  int victims[2];
  int nvictims;
  bool before;     /* die before the collective starts rather than while it is in flight */
  size_t count;    /* elements per rank (0: 16) */
  mc_op_kind_t op; /* the operation the victims die in (0: allreduce) */
} kill_args_t;

static int scenario_kill(mc_comm_t *comm, void *arg) {
  const kill_args_t *a = arg;
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  mc_harness_barrier("up", n);
  if (a->count)
    loop_count = a->count; /* large: rendezvous transfers are in flight when the victim dies */
  if (a->op)
    loop_op = a->op;
  if (warm_first && wait_standby(comm))
    return 1;
  if (a->before && me == a->victims[0])
    die_now(me);
  if (until_failure(comm, me, a->victims, a->nvictims, 5))
    return 1;
  int survivors[64];
  int ns = survivors_without(n, a->victims, a->nvictims, survivors);
  mc_comm_t *c = comm;
  if (shrink_and_verify(&c, me, survivors, ns))
    return 1;
  mc_harness_barrier("verified", ns);
  if (me == survivors[0]) {
    char what[64];
    snprintf(what, sizeof what, "kill of rank %d%s%s", a->victims[0],
             a->nvictims > 1 ? " and " : "", a->nvictims > 1 ? "another" : "");
    report(what, n, survivors, ns);
  }
  mc_comm_destroy(c);
  return 0;
}

/* A stopped rank is declared failed by heartbeat silence; when it resumes it learns that it
 * was excluded and cannot rejoin. */
static int scenario_stop(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm), victim = n - 1;
  board()->pid[me] = getpid();
  mc_harness_barrier("up", n);
  if (warm_first && wait_standby(comm))
    return 1;
  if (me == victim) {
    __atomic_store_n(&board()->killed_at, now_ns(), __ATOMIC_SEQ_CST);
    kill(getpid(), SIGSTOP);
    /* resumed by a survivor after the others shrank */
    int64_t v = 1;
    mc_request_t *req;
    CHECK(mc_allreduce(comm, &v, &v, 1, MC_INT64, MC_SUM, &req) == MC_OK, "%s", mc_last_error());
    mc_status_t st = mc_wait(req, 10000);
    CHECK(st == MC_ERR_REVOKED || st == MC_ERR_PEER_FAILED, "resumed rank: allreduce %s",
          status(st));
    mc_request_free(req);
    mc_comm_t *nc;
    st = mc_comm_shrink(comm, NULL, 0, &nc);
    CHECK(st == MC_ERR_REVOKED && strstr(mc_last_error(), "declared this rank failed"),
          "resumed rank: shrink %s: %s", status(st), mc_last_error());
    return 0;
  }
  if (until_failure(comm, me, NULL, 0, -1))
    return 1;
  int survivors[64];
  int ns = survivors_without(n, &victim, 1, survivors);
  mc_comm_t *c = comm;
  if (shrink_and_verify(&c, me, survivors, ns))
    return 1;
  mc_harness_barrier("verified", ns);
  if (me == 0) {
    report("SIGSTOP of the last rank", n, survivors, ns);
    kill(board()->pid[victim], SIGCONT);
  }
  mc_comm_destroy(c);
  return 0;
}

/* The coordinator (rank 0) dies inside the agreement, at the phase named in arg. */
static int scenario_die_in_agreement(mc_comm_t *comm, void *arg) {
  const char *phase = arg; /* main() set MC_FAULT before the ranks started */
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm), victim = n - 1;
  if (me == 0)
    mc_harness_expect_death(0);
  mc_harness_barrier("up", n);
  if (until_failure(comm, me, &victim, 1, 3))
    return 1;
  int dead[2] = {0, victim}, survivors[64];
  int ns = survivors_without(n, dead, 2, survivors);
  mc_comm_t *c = comm;
  if (shrink_and_verify(&c, me, survivors, ns))
    return 1;
  mc_harness_barrier("verified", ns);
  if (me == survivors[0]) {
    char what[96];
    snprintf(what, sizeof what, "coordinator killed at agreement phase '%s'", phase);
    report(what, n, survivors, ns);
  }
  mc_comm_destroy(c);
  return 0;
}

/* Point-to-point with a peer that dies: a pending receive fails with the peer named. */
static int scenario_p2p(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm), victim = 1;
  mc_harness_barrier("up", n);
  if (me == victim)
    die_now(me);
  if (me != 0) { /* stay until rank 0 has checked, so that only the victim is gone */
    mc_harness_barrier("p2p/checked", n - 1);
  } else {
    char buf[64];
    mc_request_t *req;
    CHECK(mc_recv(comm, buf, sizeof buf, MC_UINT8, victim, 7, &req) == MC_OK, "%s",
          mc_last_error());
    mc_status_t st = mc_wait(req, 20000);
    const char *msg = mc_request_error(req);
    CHECK(st == MC_ERR_PEER_FAILED && strstr(msg, "rank 1 failed"), "recv from dead peer: %s: %s",
          status(st), msg);
    board()->detect_ns[0] = now_ns() - board()->killed_at;
    mc_request_free(req);
    /* a send to it is refused too */
    CHECK(mc_send(comm, buf, sizeof buf, MC_UINT8, victim, 7, &req) == MC_OK, "%s",
          mc_last_error());
    st = mc_wait(req, 20000);
    CHECK(st == MC_ERR_PEER_FAILED || st == MC_ERR_REVOKED, "send to dead peer: %s", status(st));
    mc_request_free(req);
    int failed[8];
    CHECK(mc_comm_failed_ranks(comm, failed, 8) == 1 && failed[0] == victim,
          "mc_comm_failed_ranks");
    printf("  p2p: pending recv from the killed rank failed after %.1f ms\n",
           board()->detect_ns[0] / 1e6);
    mc_harness_barrier("p2p/checked", n - 1);
  }
  /* abort and destroy after a failure return promptly */
  int64_t t0 = now_ns();
  mc_comm_abort(comm);
  CHECK(now_ns() - t0 < 1000000000LL, "abort took %lld ns", (long long)(now_ns() - t0));
  return 0;
}

/* Repeated failures: one rank dies per cycle until two remain; memory, threads and file
 * descriptors must not grow from cycle to cycle. */
static int count_dir(const char *path) {
  DIR *d = opendir(path);
  int n = 0;
  for (struct dirent *e; d && (e = readdir(d));)
    n += e->d_name[0] != '.';
  if (d)
    closedir(d);
  return n;
}

static int scenario_cycles(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  mc_harness_barrier("up", n);
  mc_comm_t *c = comm;
  int alive[64], nalive = n, fds0 = -1, threads0 = -1;
  for (int r = 0; r < n; r++)
    alive[r] = r;
  for (int cycle = 0; nalive > 2; cycle++) {
    int victim = alive[(cycle * 5 + 1) % nalive]; /* spread over positions, rank 0 included */
    /* everyone has finished the previous cycle before the victim dies */
    int64_t v = 0;
    mc_request_t *req;
    RUN_OK(req, mc_allreduce(c, &v, &v, 1, MC_INT64, MC_SUM, &req));
    char bar[32];
    snprintf(bar, sizeof bar, "cycle/%d", cycle);
    mc_harness_barrier(bar, nalive);
    if (me == victim)
      die_now(me);
    if (until_failure(c, me, NULL, 0, -1))
      return 1;
    int next[64], k = 0;
    for (int i = 0; i < nalive; i++)
      if (alive[i] != victim)
        next[k++] = alive[i];
    memcpy(alive, next, sizeof next);
    nalive = k;
    mc_comm_t *old = c;
    if (shrink_and_verify(&c, me, alive, nalive))
      return 1;
    if (old != comm)
      mc_comm_destroy(old);
    int fds = count_dir("/proc/self/fd"), threads = count_dir("/proc/self/task");
    if (fds0 < 0)
      fds0 = fds, threads0 = threads;
    /* slack: the next standby endpoint may still be opening in the background */
    CHECK(fds <= fds0 + 10 && threads <= threads0 + 1,
          "rank %d cycle %d: %d fds, %d threads (after the first cycle: %d, %d)", me, cycle, fds,
          threads, fds0, threads0);
  }
  if (me == alive[0])
    printf("  cycles: %d ranks shrank to %d one failure at a time; fds and threads flat (%d, %d)\n",
           n, nalive, fds0, threads0);
  if (c != comm)
    mc_comm_destroy(c);
  return 0;
}

/* Revoke with nobody dead, then an explicit exclusion of a live rank. */
static int scenario_revoke_exclude(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm), outcast = n - 1;
  mc_harness_barrier("up", n);
  char buf[8];
  mc_request_t *req;
  if (me == 1) {
    CHECK(mc_comm_revoke(comm) == MC_OK, "revoke");
  } else {
    CHECK(mc_recv(comm, buf, 8, MC_UINT8, 1, 3, &req) == MC_OK, "%s", mc_last_error());
    mc_status_t st = mc_wait(req, 20000);
    /* rank 1's exclusion of the outcast can overtake its revoke when another rank forwards
     * it first (separate connections): either cause fails the receive */
    CHECK((st == MC_ERR_REVOKED && strstr(mc_request_error(req), "revoked")) ||
              (st == MC_ERR_PEER_FAILED && strstr(mc_request_error(req), "excluded")),
          "rank %d: recv after revoke: %s %s", me, status(st), mc_request_error(req));
    mc_request_free(req);
  }
  /* the exclusion below must not overtake the revoke (they come from different ranks) */
  mc_harness_barrier("revoked", n);
  if (me == outcast) { /* left out by the others; learns it */
    mc_comm_t *nc;
    mc_status_t st = mc_comm_shrink(comm, NULL, 0, &nc);
    CHECK(st == MC_ERR_REVOKED, "excluded rank: shrink gave %s", status(st));
    return 0;
  }
  int survivors[64];
  int ns = survivors_without(n, &outcast, 1, survivors);
  mc_comm_t *nc;
  mc_status_t st = mc_comm_shrink(comm, &outcast, 1, &nc);
  CHECK(st == MC_OK && mc_comm_size(nc) == ns, "rank %d: shrink excluding %d: %s %s", me, outcast,
        status(st), mc_last_error());
  CHECK(sum_check(nc, me, survivors, ns, NULL) == MC_OK, "allreduce after exclusion");
  /* a healthy shrink (nothing failed) keeps everyone */
  mc_comm_t *same;
  CHECK(mc_comm_shrink(nc, NULL, 0, &same) == MC_OK && mc_comm_size(same) == ns, "rank %d: %s", me,
        mc_last_error());
  CHECK(sum_check(same, me, survivors, ns, NULL) == MC_OK, "allreduce after healthy shrink");
  if (me == 0)
    printf("  revoke reached pending receives; explicit exclusion and a healthy shrink work\n");
  mc_comm_destroy(same);
  mc_comm_destroy(nc);
  return 0;
}

/* ---- measurement modes (not part of ctest) ---- */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static void percentiles(const char *what, int64_t *v, int n) {
  if (n == 0)
    return;
  qsort(v, n, sizeof *v, cmp_i64);
  int p99 = (int)(0.99 * (n - 1) + 0.5);
  printf("  %-34s n=%-4d p50 %7.1f ms   p99 %7.1f ms   max %7.1f ms\n", what, n, v[n / 2] / 1e6,
         v[p99] / 1e6, v[n - 1] / 1e6);
}

/* test_ft --bench RANKS TRIALS: SIGKILL and SIGSTOP trials, latency percentiles over all
 * survivors of all trials. */
static int bench(int size, int trials, bool cold) {
  warm_first = !cold;
  int64_t *detect[2], *shrink[2], *recover[2];
  int n[2] = {0, 0}, failed = 0;
  for (int k = 0; k < 2; k++) {
    detect[k] = calloc((size_t)trials * size, sizeof(int64_t));
    shrink[k] = calloc((size_t)trials * size, sizeof(int64_t));
    recover[k] = calloc((size_t)trials * size, sizeof(int64_t));
  }
  srand(12345);
  for (int t = 0; t < trials; t++) {
    int stop = t % 2, victim = stop ? size - 1 : rand() % size;
    kill_args_t a = {.victims = {victim}, .nvictims = 1};
    int rc = stop ? mc_harness_run(size, scenario_stop, NULL, 60)
                  : mc_harness_run(size, scenario_kill, &a, 60);
    failed += rc != 0;
    board_t *b = board();
    for (int r = 0; r < size && !rc; r++)
      if (r != victim) {
        detect[stop][n[stop]] = b->detect_ns[r];
        shrink[stop][n[stop]] = b->shrink_ns[r];
        recover[stop][n[stop]++] = b->recover_ns[r];
      }
  }
  printf("ft bench: %d ranks, %d trials (%d failed), %s, every survivor counted\n", size, trials,
         failed,
         cold ? "failure right after creation (--cold)" : "failure after the standby is connected");
  const char *names[2] = {"SIGKILL", "SIGSTOP"};
  for (int k = 0; k < 2; k++) {
    char w[64];
    snprintf(w, sizeof w, "%s: detection", names[k]);
    percentiles(w, detect[k], n[k]);
    snprintf(w, sizeof w, "%s: agreement + shrink", names[k]);
    percentiles(w, shrink[k], n[k]);
    snprintf(w, sizeof w, "%s: failure -> correct allreduce", names[k]);
    percentiles(w, recover[k], n[k]);
  }
  return failed != 0;
}

/* test_ft --soak RANKS SECONDS SPINNERS: no failure may be reported while the ranks run
 * allreduces back to back and SPINNERS processes keep every core busy. */
static int soak_seconds;

static int scenario_soak(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int me = mc_comm_rank(comm);
  int64_t end = now_ns() + (int64_t)soak_seconds * 1000000000LL, ops = 0;
  int64_t v[1024];
  for (bool done = false; !done; ops++) {
    for (int i = 0; i < 1024; i++)
      v[i] = me + i;
    v[0] = now_ns() >= end; /* the ranks stop together: when any of them is past the end */
    mc_request_t *req;
    RUN_OK(req, mc_allreduce(comm, v, v, ops % 2 ? 1024 : 8, MC_INT64, MC_SUM, &req));
    done = v[0] > 0;
  }
  CHECK(mc_comm_failed_ranks(comm, NULL, 0) == 0, "rank %d: a rank was suspected", me);
  if (me == 0)
    printf("  soak: %lld allreduces per rank in %d s, no failure reported\n", (long long)ops,
           soak_seconds);
  return 0;
}

static int soak(int size, int seconds, int spinners) {
  soak_seconds = seconds;
  pid_t spin[64];
  for (int i = 0; i < spinners && i < 64; i++)
    if ((spin[i] = fork()) == 0)
      for (volatile uint64_t x = 0;; x++) {
      }
  int rc = mc_harness_run(size, scenario_soak, NULL, seconds + 120);
  for (int i = 0; i < spinners && i < 64; i++) {
    kill(spin[i], SIGKILL);
    waitpid(spin[i], NULL, 0);
  }
  printf("ft soak: %d ranks, %d s, %d busy processes: %s\n", size, seconds, spinners,
         rc ? "FAILED (a failure was reported)" : "no false suspicion");
  return rc;
}

/* test_ft --overhead RANKS ROUNDS: failure-free cost of the detector. Rounds alternate between
 * the default heartbeats and heartbeats effectively off (MC_HEARTBEAT_MS 20 min); each round
 * measures an 8-byte allreduce's latency and a 16 MiB allreduce's bandwidth; medians over the
 * rounds of each setting. */
static int overhead_small = 2000, overhead_large = 12;
#define LARGE_COUNT (2 << 20) /* int64: 16 MiB */

static int scenario_overhead(mc_comm_t *comm, void *arg) {
  (void)arg;
  const int me = mc_comm_rank(comm);
  int64_t v = me, *big = malloc(LARGE_COUNT * sizeof *big);
  CHECK(big != NULL, "out of memory");
  for (size_t i = 0; i < LARGE_COUNT; i++)
    big[i] = (int64_t)i + me;
  mc_request_t *req;
  for (int i = 0; i < 100; i++) /* warm-up */
    RUN_OK(req, mc_allreduce(comm, &v, &v, 1, MC_INT64, MC_SUM, &req));
  RUN_OK(req, mc_barrier(comm, &req));
  int64_t t0 = now_ns();
  for (int i = 0; i < overhead_small; i++)
    RUN_OK(req, mc_allreduce(comm, &v, &v, 1, MC_INT64, MC_MAX, &req));
  int64_t t1 = now_ns();
  RUN_OK(req, mc_allreduce(comm, big, big, LARGE_COUNT, MC_INT64, MC_MAX, &req));
  RUN_OK(req, mc_barrier(comm, &req));
  int64_t t2 = now_ns();
  for (int i = 0; i < overhead_large; i++)
    RUN_OK(req, mc_allreduce(comm, big, big, LARGE_COUNT, MC_INT64, MC_MAX, &req));
  int64_t t3 = now_ns();
  free(big);
  if (me == 0) {
    board()->detect_ns[0] = (t1 - t0) / overhead_small;
    board()->detect_ns[1] = (t3 - t2) / overhead_large;
  }
  return 0;
}

static int overhead(int size, int rounds) {
  int64_t *lat[2], *big[2];
  int n[2] = {0, 0}, failed = 0;
  for (int k = 0; k < 2; k++) {
    lat[k] = calloc(rounds, sizeof(int64_t));
    big[k] = calloc(rounds, sizeof(int64_t));
  }
  for (int r = 0; r < 2 * rounds; r++) {
    int off = r % 2; /* interleaved: both settings see the same background */
    if (off) {       /* the ranks read their parameters after the harness forked them */
      setenv("MC_HEARTBEAT_MS", "1200000", 1);
      setenv("MC_FAILURE_TIMEOUT_MS", "3600000", 1);
    } else {
      unsetenv("MC_HEARTBEAT_MS");
      unsetenv("MC_FAILURE_TIMEOUT_MS");
    }
    if (mc_harness_run(size, scenario_overhead, NULL, 300)) {
      failed++;
      continue;
    }
    lat[off][n[off]] = board()->detect_ns[0];
    big[off][n[off]++] = board()->detect_ns[1];
  }
  const char *names[2] = {"heartbeats on (50 ms)", "heartbeats off"};
  double med_lat[2] = {0, 0}, med_bw[2] = {0, 0};
  printf("ft overhead: %d ranks, %d rounds per setting (%d failed), medians\n", size, rounds,
         failed);
  for (int k = 0; k < 2 && n[0] && n[1]; k++) {
    qsort(lat[k], n[k], sizeof(int64_t), cmp_i64);
    qsort(big[k], n[k], sizeof(int64_t), cmp_i64);
    med_lat[k] = lat[k][n[k] / 2] / 1e3;
    med_bw[k] = LARGE_COUNT * 8.0 / (big[k][n[k] / 2] / 1e9) / 1e9; /* algorithm bandwidth */
    printf("  %-22s 8 B allreduce %8.1f us (min %.1f, max %.1f)   16 MiB allreduce %6.3f GB/s\n",
           names[k], med_lat[k], lat[k][0] / 1e3, lat[k][n[k] - 1] / 1e3, med_bw[k]);
  }
  if (n[0] && n[1])
    printf("  detector cost: latency %+.2f %%, bandwidth %+.2f %%\n",
           100.0 * (med_lat[0] - med_lat[1]) / med_lat[1],
           100.0 * (med_bw[0] - med_bw[1]) / med_bw[1]);
  return failed != 0;
}

int main(int argc, char **argv) {
  if (argc > 3 && !strcmp(argv[1], "--bench"))
    return bench(atoi(argv[2]), atoi(argv[3]), argc > 4 && !strcmp(argv[4], "--cold"));
  if (argc > 3 && !strcmp(argv[1], "--overhead"))
    return overhead(atoi(argv[2]), atoi(argv[3]));
  if (argc > 4 && !strcmp(argv[1], "--soak"))
    return soak(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
  int size = argc > 1 ? atoi(argv[1]) : 4;
  if (size < 4 || size > 64) {
    fprintf(stderr, "test_ft needs 4..64 ranks\n");
    return 2;
  }
  kill_args_t during = {.victims = {1}, .nvictims = 1};
  kill_args_t rank0 = {.victims = {0}, .nvictims = 1};
  kill_args_t before = {.victims = {size - 1}, .nvictims = 1, .before = true};
  kill_args_t two = {.victims = {1, 2}, .nvictims = 2};
  kill_args_t large = {.victims = {2}, .nvictims = 1, .count = 4 << 20};
  /* across hosts, rank r on host r % hosts: a leader dies, then a rank that is not one */
  kill_args_t gather = {.victims = {1}, .nvictims = 1, .count = 1 << 16, .op = MC_OP_ALLGATHER};
  kill_args_t scatter = {.victims = {size - 1}, .nvictims = 1, .count = 1 << 16};
  scatter.op = MC_OP_REDUCE_SCATTER;
  struct {
    const char *name;
    mc_test_body_t body;
    void *arg;
  } scenarios[] = {
      {"kill during allreduce", scenario_kill, &during},
      {"kill rank 0", scenario_kill, &rank0},
      {"kill before allreduce", scenario_kill, &before},
      {"two killed at once", scenario_kill, &two},
      {"kill during a 32 MiB allreduce", scenario_kill, &large},
      {"kill during a 512 KiB-per-rank allgather", scenario_kill, &gather},
      {"kill during a 512 KiB-per-rank reduce_scatter", scenario_kill, &scatter},
      {"stop (hang)", scenario_stop, NULL},
      {"coordinator dies before accept", scenario_die_in_agreement, "accept"},
      {"coordinator dies before commit", scenario_die_in_agreement, "commit"},
      {"coordinator dies mid-commit", scenario_die_in_agreement, "commit-partial"},
      {"p2p with a dead peer, abort", scenario_p2p, NULL},
      {"repeated fail/shrink", scenario_cycles, NULL},
      {"revoke and exclude", scenario_revoke_exclude, NULL},
  };
  const int count = sizeof scenarios / sizeof scenarios[0];
  const char *only = getenv("MC_TEST_ONLY");
  int passed = 0, ran = 0;
  for (int i = 0; i < count; i++) {
    if (only && !strstr(scenarios[i].name, only))
      continue;
    ran++;
    int64_t t0 = now_ns();
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
      if (scenarios[i].body == scenario_die_in_agreement) {
        char rule[128];
        snprintf(rule, sizeof rule, "rank=0,op=agree,phase=%s,action=kill",
                 (const char *)scenarios[i].arg);
        setenv("MC_FAULT", rule, 1);
      }
      _exit(mc_harness_run(size, scenarios[i].body, scenarios[i].arg, 60) ? 1 : 0);
    }
    int st = 0;
    int rc = pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st);
    printf("scenario %d (%s): %s in %.0f ms\n", i + 1, scenarios[i].name, rc ? "FAILED" : "passed",
           (now_ns() - t0) / 1e6);
    fflush(stdout);
    passed += !rc;
  }
  printf("test_ft: %d of %d scenarios passed (%d ranks, %s)\n", passed, ran, size,
         getenv("MC_TRANSPORT") ? getenv("MC_TRANSPORT") : "auto");
  return passed == ran && ran > 0 ? 0 : 1;
}
