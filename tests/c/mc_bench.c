/* mc-bench: the engine's collectives timed on N forked ranks (no torch), nccl-tests columns.
 *
 *   mc-bench -o allreduce -n 2 -b 8 -e 16M -f 4 -i 20 -r 5
 *
 * Each row: size (bytes of the largest buffer, as nccl-tests), count (elements per rank as
 * nccl-tests counts them), type, redop, root, time (median over -r repeats of -i back-to-back
 * operations, the slowest rank's), algbw = size / time, busbw = algbw x the nccl-tests factor,
 * #wrong (elements that differ from the known result, all ranks, checked in a separate run),
 * then single-core memcpy bandwidth for the same bytes measured on rank 0 in the same run (the
 * fastest of 5), and
 * busbw as a percentage of it. Benchmarks print numbers; nothing here asserts a timing.
 *
 * --netns PREFIX [--netns-count N]: rank r enters the network namespace PREFIX-r<r % N>
 * (/var/run/netns) before it creates its communicator, so traffic crosses veth links (python -m
 * mooncake.bench --netns sets such a lab up and runs this). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

typedef enum {
  OP_ALLREDUCE,
  OP_ALLGATHER,
  OP_REDUCE_SCATTER,
  OP_BROADCAST,
  OP_ALLTOALL,
  OP_SENDRECV,
  OP_COUNT
} op_t;

static const char *op_names[OP_COUNT] = {"allreduce", "allgather", "reduce_scatter",
                                         "broadcast", "alltoall",  "sendrecv"};

typedef struct {
  int ops[OP_COUNT], nops;
  mc_dtype_t dtype;
  size_t min_bytes, max_bytes;
  int factor, iters, warmup, repeats, check, ranks;
  const char *netns;
  int netns_count; /* rank r enters namespace r % netns_count */
} opts_t;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
  qsort(v, n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Element i of rank r's data: small integers, exact in every dtype and in every sum order. */
static double value(int r, size_t i) { return (double)(r + 1) + (double)(i % 7); }

static void put(void *buf, size_t i, mc_dtype_t t, double v) {
  switch (t) {
  case MC_FLOAT32: ((float *)buf)[i] = (float)v; break;
  case MC_FLOAT64: ((double *)buf)[i] = v; break;
  case MC_INT32: ((int32_t *)buf)[i] = (int32_t)v; break;
  case MC_INT64: ((int64_t *)buf)[i] = (int64_t)v; break;
  case MC_BFLOAT16: {
    float f = (float)v;
    uint32_t b;
    memcpy(&b, &f, 4);
    ((uint16_t *)buf)[i] = (uint16_t)(b >> 16);
    break;
  }
  default: break;
  }
}

static double get(const void *buf, size_t i, mc_dtype_t t) {
  switch (t) {
  case MC_FLOAT32: return ((const float *)buf)[i];
  case MC_FLOAT64: return ((const double *)buf)[i];
  case MC_INT32: return ((const int32_t *)buf)[i];
  case MC_INT64: return (double)((const int64_t *)buf)[i];
  case MC_BFLOAT16: {
    uint32_t b = (uint32_t)((const uint16_t *)buf)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
  }
  default: return NAN;
  }
}

typedef struct {
  op_t op;
  int n, me;
  size_t count; /* the count column: per-rank element count as nccl-tests shows it */
  size_t in_elems, out_elems;
  char *in, *out;
  mc_dtype_t t;
} run_t;

/* Sizes a row: nccl-tests' size is the largest buffer in bytes. */
static size_t row_count(op_t op, size_t bytes, size_t esz, int n) {
  size_t elems = bytes / esz;
  switch (op) {
  case OP_ALLGATHER:
  case OP_REDUCE_SCATTER:
  case OP_ALLTOALL: return elems / n;
  default: return elems;
  }
}

static void buffers(run_t *r) {
  size_t c = r->count, n = (size_t)r->n;
  switch (r->op) {
  case OP_ALLGATHER: r->in_elems = c, r->out_elems = c * n; break;
  case OP_REDUCE_SCATTER: r->in_elems = c * n, r->out_elems = c; break;
  case OP_ALLTOALL: r->in_elems = r->out_elems = c * n; break;
  case OP_BROADCAST: r->in_elems = 0, r->out_elems = c; break;
  default: r->in_elems = r->out_elems = c; break;
  }
}

static void fill_inputs(run_t *r) {
  mc_dtype_t t = r->t;
  if (r->op == OP_BROADCAST) {
    for (size_t i = 0; i < r->out_elems; i++)
      put(r->out, i, t, r->me == 0 ? value(0, i) : -1);
    return;
  }
  for (size_t i = 0; i < r->in_elems; i++)
    put(r->in, i, t, value(r->me, i));
  for (size_t i = 0; i < r->out_elems; i++)
    put(r->out, i, t, -1);
}

static mc_status_t start(run_t *r, mc_comm_t *comm, mc_request_t **req, mc_request_t **req2) {
  *req2 = NULL;
  switch (r->op) {
  case OP_ALLREDUCE: return mc_allreduce(comm, r->in, r->out, r->count, r->t, MC_SUM, req);
  case OP_ALLGATHER: return mc_allgather(comm, r->in, r->out, r->count, r->t, req);
  case OP_REDUCE_SCATTER:
    return mc_reduce_scatter(comm, r->in, r->out, r->count, r->t, MC_SUM, req);
  case OP_BROADCAST: return mc_broadcast(comm, r->out, r->count, r->t, 0, req);
  case OP_ALLTOALL: return mc_alltoall(comm, r->in, r->out, r->count, r->t, req);
  case OP_SENDRECV: {
    mc_status_t st = mc_recv(comm, r->out, r->count, r->t, (r->me + r->n - 1) % r->n, 0, req2);
    if (st != MC_OK)
      return st;
    return mc_send(comm, r->in, r->count, r->t, (r->me + 1) % r->n, 0, req);
  }
  default: return MC_ERR_INVALID;
  }
}

static int run_once(run_t *r, mc_comm_t *comm) {
  mc_request_t *req, *req2;
  mc_status_t st = start(r, comm, &req, &req2);
  if (st == MC_OK)
    st = mc_wait(req, -1), mc_request_free(req);
  if (req2) {
    mc_status_t st2 = mc_wait(req2, -1);
    st = st == MC_OK ? st2 : st;
    if (st2 != MC_OK)
      fprintf(stderr, "rank %d: %s\n", r->me, mc_request_error(req2));
    mc_request_free(req2);
  }
  if (st != MC_OK) {
    fprintf(stderr, "rank %d: %s failed: %s (%s)\n", r->me, op_names[r->op], mc_status_str(st),
            mc_last_error());
    return 1;
  }
  return 0;
}

static double expected(const run_t *r, size_t i) {
  int n = r->n;
  double s = 0;
  switch (r->op) {
  case OP_ALLREDUCE:
    for (int k = 0; k < n; k++)
      s += value(k, i);
    return s;
  case OP_REDUCE_SCATTER:
    for (int k = 0; k < n; k++)
      s += value(k, r->me * r->count + i);
    return s;
  case OP_ALLGATHER: return value((int)(i / r->count), i % r->count);
  case OP_BROADCAST: return value(0, i);
  case OP_ALLTOALL: return value((int)(i / r->count), r->me * r->count + i % r->count);
  case OP_SENDRECV: return value((r->me + n - 1) % n, i);
  default: return NAN;
  }
}

static long count_wrong(const run_t *r) {
  long wrong = 0;
  for (size_t i = 0; i < r->out_elems; i++)
    wrong += get(r->out, i, r->t) != expected(r, i);
  return wrong;
}

static mc_status_t allreduce_scalar(mc_comm_t *comm, void *v, mc_dtype_t t, mc_redop_t op) {
  mc_request_t *req;
  mc_status_t st = mc_allreduce(comm, v, v, 1, t, op, &req);
  if (st == MC_OK)
    st = mc_wait(req, -1), mc_request_free(req);
  return st;
}

static int barrier(mc_comm_t *comm) {
  mc_request_t *req;
  mc_status_t st = mc_barrier(comm, &req);
  if (st == MC_OK)
    st = mc_wait(req, -1), mc_request_free(req);
  return st != MC_OK;
}

/* Single-core memcpy of `bytes`, GB/s: the fastest of repeats (what one core can do), each long
 * enough to time. */
static double memcpy_gbps(size_t bytes, int repeats) {
  if (!bytes)
    return 0;
  char *a = malloc(bytes), *b = malloc(bytes);
  memset(a, 1, bytes), memset(b, 2, bytes);
  int reps = (int)(64e6 / (double)bytes) + 1;
  double samples[64];
  if (repeats > 64)
    repeats = 64;
  for (int k = 0; k < repeats; k++) {
    double t0 = now_s();
    for (int i = 0; i < reps; i++) {
      memcpy(b, a, bytes);
      __asm__ volatile("" ::"r"(b) : "memory");
    }
    samples[k] = (now_s() - t0) / reps;
  }
  free(a), free(b);
  qsort(samples, repeats, sizeof *samples, cmp_double);
  return bytes / samples[0] / 1e9;
}

/* MC_BENCH_THP=1: 2 MiB-aligned buffers advised to use transparent huge pages (as torch's
 * THP_MEM_ALLOC_ENABLE=1 does), to see what page size does to single-copy reads. */
static void *big_alloc(size_t bytes) {
  const char *thp = getenv("MC_BENCH_THP");
  if (!thp || !atoi(thp) || bytes < (2u << 20))
    return malloc(bytes);
  size_t huge = 2u << 20, len = (bytes + huge - 1) & ~(huge - 1);
  void *p = aligned_alloc(huge, len);
  if (p)
    madvise(p, len, MADV_HUGEPAGE);
  return p;
}

static double busbw_factor(op_t op, int n) {
  switch (op) {
  case OP_ALLREDUCE: return 2.0 * (n - 1) / n;
  case OP_ALLGATHER:
  case OP_REDUCE_SCATTER:
  case OP_ALLTOALL: return (double)(n - 1) / n;
  default: return 1;
  }
}

static int bench_op(mc_comm_t *comm, const opts_t *o, op_t op, double *bus_sum, int *rows) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  const size_t esz = mc_dtype_size(o->dtype);
  if (me == 0) {
    printf("#\n# %s, %d ranks (%s), %s, %d iters x %d repeats (median), warm-up %d\n", op_names[op],
           n, mc_comm_transport(comm), mc_dtype_name(o->dtype), o->iters, o->repeats, o->warmup);
    printf("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s\n", "size", "count", "type",
           "redop", "root", "time", "algbw", "busbw", "#wrong", "memcpy", "bus/mc");
    printf("# %10s  %12s  %8s  %6s  %6s  %7s  %6s  %6s  %6s  %7s  %6s\n", "(B)", "(elements)", "",
           "", "", "(us)", "(GB/s)", "(GB/s)", "", "(GB/s)", "(%)");
  }
  for (size_t bytes = o->min_bytes; bytes <= o->max_bytes; bytes *= o->factor) {
    run_t r = {.op = op, .n = n, .me = me, .t = o->dtype};
    r.count = row_count(op, bytes, esz, n);
    if (!r.count)
      continue; /* smaller than one element per rank */
    buffers(&r);
    r.in = big_alloc(r.in_elems * esz + 64);
    r.out = big_alloc(r.out_elems * esz + 64);
    fill_inputs(&r);
    size_t size = (r.in_elems > r.out_elems ? r.in_elems : r.out_elems) * esz;
    int fail = 0;
    for (int w = 0; w < o->warmup && !fail; w++)
      fail = run_once(&r, comm);
    double samples[256];
    int reps = o->repeats > 256 ? 256 : o->repeats;
    for (int k = 0; k < reps && !fail; k++) {
      fail = barrier(comm);
      double t0 = now_s();
      for (int i = 0; i < o->iters && !fail; i++)
        fail = run_once(&r, comm);
      samples[k] = (now_s() - t0) / o->iters;
    }
    if (fail)
      return 1;
    double t = median(samples, reps);
    CHECK(allreduce_scalar(comm, &t, MC_FLOAT64, MC_MAX) == MC_OK, "time reduction");
    int64_t wrong = -1;
    if (o->check) {
      fill_inputs(&r);
      CHECK(run_once(&r, comm) == 0, "check run");
      wrong = count_wrong(&r);
      CHECK(allreduce_scalar(comm, &wrong, MC_INT64, MC_SUM) == MC_OK, "#wrong reduction");
    }
    double mc = 0;
    if (me == 0)
      mc = memcpy_gbps(size, 5); /* the other ranks wait in the barrier */
    CHECK(barrier(comm) == 0, "barrier");
    if (me == 0) {
      double algbw = size / t / 1e9, busbw = algbw * busbw_factor(op, n);
      char wrong_s[16];
      snprintf(wrong_s, sizeof wrong_s, wrong < 0 ? "N/A" : "%lld", (long long)wrong);
      printf("  %10zu  %12zu  %8s  %6s  %6d  %7.1f  %6.3f  %6.3f  %6s  %7.2f  %6.1f\n", size,
             r.count, mc_dtype_name(o->dtype),
             op == OP_ALLREDUCE || op == OP_REDUCE_SCATTER ? "sum" : "none",
             op == OP_BROADCAST ? 0 : -1, t * 1e6, algbw, busbw, wrong_s, mc,
             mc > 0 ? 100 * busbw / mc : 0.0);
      fflush(stdout);
      *bus_sum += busbw;
      ++*rows;
    }
    free(r.in), free(r.out);
    if (o->check && wrong != 0) {
      if (me == 0)
        fprintf(stderr, "mc-bench: %s size %zu: %lld wrong elements\n", op_names[op], size,
                (long long)wrong);
      return 1;
    }
  }
  return 0;
}

static int body(mc_comm_t *comm, void *arg) {
  const opts_t *o = arg;
  double bus_sum = 0;
  int rows = 0, rc = 0;
  for (int k = 0; k < o->nops && !rc; k++)
    rc = bench_op(comm, o, o->ops[k], &bus_sum, &rows);
  if (mc_comm_rank(comm) == 0 && rows)
    printf("# Avg bus bandwidth    : %g\n#\n", bus_sum / rows);
  return rc;
}

static size_t parse_size(const char *s) {
  char *end;
  double v = strtod(s, &end);
  switch (*end) {
  case 'k':
  case 'K': v *= 1 << 10; break;
  case 'm':
  case 'M': v *= 1 << 20; break;
  case 'g':
  case 'G': v *= 1 << 30; break;
  default: break;
  }
  return (size_t)v;
}

static int usage(void) {
  fprintf(stderr,
          "usage: mc-bench [-o op[,op..]|all] [-n ranks] [-d float|double|int32|int64|bfloat16]\n"
          "                [-b min_bytes] [-e max_bytes] [-f factor] [-i iters] [-w warmup]\n"
          "                [-r repeats] [-c 0|1 check] [-t timeout_s] [--netns PREFIX]\n"
          "                [--netns-count N]\n"
          "ops: allreduce allgather reduce_scatter broadcast alltoall sendrecv\n");
  return 2;
}

int main(int argc, char **argv) {
  opts_t o = {.dtype = MC_FLOAT32,
              .min_bytes = 8,
              .max_bytes = 16 << 20,
              .factor = 4,
              .iters = 20,
              .warmup = 2,
              .repeats = 5,
              .check = 1,
              .ranks = 2};
  const char *ops = "allreduce";
  int timeout_s = 600;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v)
      return usage();
    i++;
    if (!strcmp(a, "-o"))
      ops = v;
    else if (!strcmp(a, "-n"))
      o.ranks = atoi(v);
    else if (!strcmp(a, "-b"))
      o.min_bytes = parse_size(v);
    else if (!strcmp(a, "-e"))
      o.max_bytes = parse_size(v);
    else if (!strcmp(a, "-f"))
      o.factor = atoi(v);
    else if (!strcmp(a, "-i"))
      o.iters = atoi(v);
    else if (!strcmp(a, "-w"))
      o.warmup = atoi(v);
    else if (!strcmp(a, "-r"))
      o.repeats = atoi(v);
    else if (!strcmp(a, "-c"))
      o.check = atoi(v);
    else if (!strcmp(a, "-t"))
      timeout_s = atoi(v);
    else if (!strcmp(a, "--netns"))
      o.netns = v;
    else if (!strcmp(a, "--netns-count"))
      o.netns_count = atoi(v);
    else if (!strcmp(a, "-d")) {
      const char *names[] = {"float", "double", "int32", "int64", "bfloat16"};
      const mc_dtype_t types[] = {MC_FLOAT32, MC_FLOAT64, MC_INT32, MC_INT64, MC_BFLOAT16};
      int k = 0;
      while (k < 5 && strcmp(v, names[k]))
        k++;
      if (k == 5)
        return usage();
      o.dtype = types[k];
    } else
      return usage();
  }
  if (o.ranks < 1 || o.ranks > 256 || o.factor < 2 || o.iters < 1 || o.repeats < 1 ||
      o.min_bytes < 1)
    return usage();
  char list[256];
  snprintf(list, sizeof list, "%s",
           !strcmp(ops, "all") ? "allreduce,allgather,reduce_scatter,"
                                 "broadcast,alltoall,sendrecv"
                               : ops);
  for (char *save, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    int k = 0;
    while (k < OP_COUNT && strcmp(tok, op_names[k]))
      k++;
    if (k == OP_COUNT || o.nops == OP_COUNT)
      return usage();
    o.ops[o.nops++] = k;
  }
  if (o.netns)
    mc_harness_netns(o.netns, o.netns_count);
  /* rank 0 measuring memcpy on a loaded machine must not be declared failed */
  setenv("MC_FAILURE_TIMEOUT_MS", "10000", 0);
  printf("# mc-bench: %d ranks, sizes %zu..%zu x%d, MC_TRANSPORT=%s MC_OFI_STREAMS=%s%s%s\n",
         o.ranks, o.min_bytes, o.max_bytes, o.factor,
         getenv("MC_TRANSPORT") ? getenv("MC_TRANSPORT") : "auto",
         getenv("MC_OFI_STREAMS") ? getenv("MC_OFI_STREAMS") : "1", o.netns ? " netns " : "",
         o.netns ? o.netns : "");
  int rc = mc_harness_run(o.ranks, body, &o, timeout_s);
  if (rc)
    fprintf(stderr, "mc-bench: FAILED\n");
  return rc;
}
