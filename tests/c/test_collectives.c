/* Every operation x dtype x reduce op x awkward size on N real ranks, compared bit for bit
 * against a plain computation. Inputs are small integers so every reduction order is exact. */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "harness.h"
#include "reduce.h"

static const size_t counts[] = {0, 1, 2, 7, 1023, 16411, 100003};
#define NCOUNTS (sizeof counts / sizeof counts[0])

/* Writes element i of rank r's input for (dtype, op) as an exactly representable value. */
static void fill(void *buf, size_t count, mc_dtype_t t, mc_redop_t op, int r) {
  if (t == MC_COMPLEX64 || t == MC_COMPLEX128) { /* (real, imag) pairs of small integers */
    fill(buf, 2 * count, t == MC_COMPLEX64 ? MC_FLOAT32 : MC_FLOAT64, op, r);
    return;
  }
  if (mc_dtype_size(t) == 1 && t >= MC_FLOAT8_E4M3FN) { /* float8: moved, never reduced */
    for (size_t i = 0; i < count; i++)
      ((uint8_t *)buf)[i] = (uint8_t)(r * 31 + i * 7 + t);
    return;
  }
  for (size_t i = 0; i < count; i++) {
    long v;
    if (t == MC_BOOL)
      v = (r + i) % 3 == 0;
    else if (op == MC_PRODUCT)
      v = (r + i) % 3 == 0 ? 2 : ((r + i) % 5 == 0 && t != MC_UINT8 ? -1 : 1);
    else
      v = (long)((r * 7 + i * 3) % 11) - (t == MC_UINT8 ? 0 : 5);
    char *p = (char *)buf + i * mc_dtype_size(t);
    switch (t) {
    case MC_FLOAT32: *(float *)p = (float)v; break;
    case MC_FLOAT64: *(double *)p = (double)v; break;
    case MC_FLOAT16: { /* small integers: exact half bit patterns via float32 conversion */
      float f = (float)v;
      uint32_t b;
      memcpy(&b, &f, 4);
      uint16_t h = 0;
      if (f != 0) {
        int e = (int)((b >> 23) & 0xff) - 127 + 15;
        h = (uint16_t)((b >> 16) & 0x8000) | (uint16_t)(e << 10) | (uint16_t)((b >> 13) & 0x3ff);
      } else {
        h = (uint16_t)((b >> 16) & 0x8000);
      }
      memcpy(p, &h, 2);
      break;
    }
    case MC_BFLOAT16: {
      float f = (float)v;
      uint32_t b;
      memcpy(&b, &f, 4);
      uint16_t h = (uint16_t)(b >> 16);
      memcpy(p, &h, 2);
      break;
    }
    case MC_INT8: *(int8_t *)p = (int8_t)v; break;
    case MC_INT16: *(int16_t *)p = (int16_t)v; break;
    case MC_INT32: *(int32_t *)p = (int32_t)v; break;
    case MC_INT64: *(int64_t *)p = (int64_t)v; break;
    case MC_UINT8: *(uint8_t *)p = (uint8_t)v; break;
    case MC_BOOL: *(uint8_t *)p = (uint8_t)v; break;
    default: break;
    }
  }
}

/* A complex product's zero components come out +0 or -0 depending on the reduction order (the
 * hierarchical allreduce and reduce_scatter reduce per host first): equal values, so both count as
 * +0. */
static void unsign_zeros(void *buf, size_t count, mc_dtype_t t) {
  if (t == MC_COMPLEX64)
    for (size_t i = 0; i < 2 * count; i++)
      ((float *)buf)[i] += 0.0f; /* -0 + +0 = +0 */
  if (t == MC_COMPLEX128)
    for (size_t i = 0; i < 2 * count; i++)
      ((double *)buf)[i] += 0.0;
}

static int test_allreduce(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  int checks = 0;
  for (int t = 0; t < MC_DTYPE_COUNT; t++)
    for (int op = 0; op < MC_REDOP_COUNT; op++) {
      if (mc_reduce_supported(t, op) != MC_OK || op == MC_PREMUL_SUM)
        continue;
      for (size_t c = 0; c < NCOUNTS; c++) {
        size_t count = counts[c], bytes = count * mc_dtype_size(t);
        char *in = malloc(bytes + 1), *out = malloc(bytes + 1), *want = malloc(bytes + 1),
             *peer = malloc(bytes + 1);
        fill(in, count, t, op, me);
        fill(want, count, t, op, 0);
        for (int r = 1; r < n; r++) {
          fill(peer, count, t, op, r);
          mc_reduce_local(want, peer, count, t, op);
        }
        if (op == MC_AVG)
          mc_scale_div(want, count, t, n);
        bool inplace = c % 2;
        if (inplace)
          memcpy(out, in, bytes);
        mc_request_t *req;
        RUN_OK(req, mc_allreduce(comm, inplace ? out : in, out, count, t, op, &req));
        unsign_zeros(out, count, t);
        unsign_zeros(want, count, t);
        CHECK(!memcmp(out, want, bytes), "allreduce %s %s count %zu %s: wrong result",
              mc_dtype_name(t), mc_redop_name(op), count, inplace ? "in place" : "");
        free(in), free(out), free(want), free(peer);
        checks++;
      }
    }
  if (me == 0)
    printf("allreduce: %d dtype x op x count cases\n", checks);
  return 0;
}

static int test_reduce_scatter(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  float overlap[64];
  mc_request_t *bad;
  CHECK(mc_reduce_scatter(comm, overlap, overlap + me * 2, 2, MC_FLOAT32, MC_SUM, &bad) ==
            MC_ERR_INVALID,
        "in-place reduce_scatter must be rejected: %s", mc_last_error());
  for (int t = 0; t < MC_DTYPE_COUNT; t++)
    for (int op = 0; op < MC_REDOP_COUNT; op++) {
      if (mc_reduce_supported(t, op) != MC_OK || op == MC_PREMUL_SUM)
        continue;
      for (size_t c = 0; c < NCOUNTS - 1; c++) { /* the largest count x ranks is slow here */
        size_t count = counts[c], esz = mc_dtype_size(t), bytes = count * esz;
        char *in = malloc(bytes * n + 1), *out = malloc(bytes + 1), *want = malloc(bytes * n + 1),
             *peer = malloc(bytes * n + 1);
        fill(in, count * n, t, op, me);
        fill(want, count * n, t, op, 0);
        for (int r = 1; r < n; r++) {
          fill(peer, count * n, t, op, r);
          mc_reduce_local(want, peer, count * n, t, op);
        }
        if (op == MC_AVG)
          mc_scale_div(want, count * n, t, n);
        mc_request_t *req;
        RUN_OK(req, mc_reduce_scatter(comm, in, out, count, t, op, &req));
        unsign_zeros(out, count, t);
        unsign_zeros(want + me * bytes, count, t);
        CHECK(!memcmp(out, want + me * bytes, bytes),
              "reduce_scatter %s %s count %zu: wrong result", mc_dtype_name(t), mc_redop_name(op),
              count);
        free(in), free(out), free(want), free(peer);
      }
    }
  return 0;
}

static int test_allgather(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int t = 0; t < MC_DTYPE_COUNT; t++)
    for (size_t c = 0; c < NCOUNTS; c++) {
      size_t count = counts[c], bytes = count * mc_dtype_size(t);
      char *out = malloc(bytes * n + 1), *want = malloc(bytes * n + 1), *in = malloc(bytes + 1);
      for (int r = 0; r < n; r++)
        fill(want + r * bytes, count, t, MC_SUM, r);
      fill(in, count, t, MC_SUM, me);
      bool inplace = c % 2;
      if (inplace)
        memcpy(out + me * bytes, in, bytes);
      mc_request_t *req;
      RUN_OK(req, mc_allgather(comm, inplace ? out + me * bytes : in, out, count, t, &req));
      CHECK(!memcmp(out, want, bytes * n), "allgather %s count %zu: wrong result", mc_dtype_name(t),
            count);
      free(out), free(want), free(in);
    }
  return 0;
}

static int test_broadcast(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int root = 0; root < n; root++)
    for (int t = 0; t < MC_DTYPE_COUNT; t += 3)
      for (size_t c = 0; c < NCOUNTS; c++) {
        size_t count = counts[c], bytes = count * mc_dtype_size(t);
        char *buf = malloc(bytes + 1), *want = malloc(bytes + 1);
        fill(want, count, t, MC_SUM, root + 1);
        if (me == root)
          memcpy(buf, want, bytes);
        else
          memset(buf, 0x5a, bytes);
        mc_request_t *req;
        RUN_OK(req, mc_broadcast(comm, buf, count, t, root, &req));
        CHECK(!memcmp(buf, want, bytes), "broadcast %s count %zu root %d: wrong result",
              mc_dtype_name(t), count, root);
        free(buf), free(want);
      }
  return 0;
}

/* ---- rooted and all-to-all operations ---- */

static const size_t small_counts[] = {0, 1, 7, 1023, 16411};
#define NSMALL (sizeof small_counts / sizeof small_counts[0])

/* want = op over ranks r of fill(r) (each input scaled by factor(r) for PREMUL_SUM), computed
 * rank by rank in plain code. `n_blocks` blocks of `count` elements. */
static double premul_factor(int r) { return 0.5 * (r + 1); }

static void expected(char *want, size_t count, mc_dtype_t t, mc_redop_t op, int n) {
  char *peer = malloc(count * mc_dtype_size(t) + 1);
  mc_redop_t fill_op = op == MC_PREMUL_SUM ? MC_SUM : op;
  fill(want, count, t, fill_op, 0);
  if (op == MC_PREMUL_SUM)
    mc_premul(want, want, count, t, premul_factor(0));
  for (int r = 1; r < n; r++) {
    fill(peer, count, t, fill_op, r);
    if (op == MC_PREMUL_SUM)
      mc_premul(peer, peer, count, t, premul_factor(r));
    mc_reduce_local(want, peer, count, t, op);
  }
  if (op == MC_AVG)
    mc_scale_div(want, count, t, n);
  free(peer);
}

/* Bit-exact, except that complex products may differ in the sign of a zero part: which zero
 * comes out depends on the order the tree multiplies in (a*d + b*c with exact values). */
static bool same_result(const char *got, const char *want, size_t count, mc_dtype_t t) {
  if (!memcmp(got, want, count * mc_dtype_size(t)))
    return true;
  for (size_t i = 0; i < 2 * count && (t == MC_COMPLEX64 || t == MC_COMPLEX128); i++)
    if (t == MC_COMPLEX64 ? ((const float *)got)[i] != ((const float *)want)[i]
                          : ((const double *)got)[i] != ((const double *)want)[i])
      return false;
  return t == MC_COMPLEX64 || t == MC_COMPLEX128;
}

static int check_reduce(mc_comm_t *comm, mc_dtype_t t, mc_redop_t op, size_t count, int root,
                        bool inplace) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  const size_t bytes = count * mc_dtype_size(t);
  char *in = malloc(bytes + 1), *orig = malloc(bytes + 1), *want = malloc(bytes + 1);
  char *out = me == root ? malloc(bytes + 1) : NULL;
  fill(in, count, t, op == MC_PREMUL_SUM ? MC_SUM : op, me);
  memcpy(orig, in, bytes);
  const void *src = in;
  if (inplace && me == root)
    memcpy(out, in, bytes), src = out;
  mc_request_t *req;
  if (op == MC_PREMUL_SUM)
    RUN_OK(req, mc_reduce_premul(comm, src, out, count, t, premul_factor(me), root, &req));
  else
    RUN_OK(req, mc_reduce(comm, src, out, count, t, op, root, &req));
  CHECK(!memcmp(in, orig, bytes), "reduce %s %s count %zu: input modified", mc_dtype_name(t),
        mc_redop_name(op), count);
  if (me == root) {
    expected(want, count, t, op, n);
    CHECK(same_result(out, want, count, t), "reduce %s %s count %zu root %d%s: wrong result",
          mc_dtype_name(t), mc_redop_name(op), count, root, inplace ? " in place" : "");
  }
  free(in), free(orig), free(want), free(out);
  return 0;
}

static int test_reduce_to_root(mc_comm_t *comm) {
  const int n = mc_comm_size(comm);
  int combo = 0;
  for (int t = 0; t < MC_DTYPE_COUNT; t++)
    for (int op = 0; op < MC_REDOP_COUNT; op++) {
      if (mc_reduce_supported(t, op) != MC_OK || op == MC_PREMUL_SUM)
        continue;
      for (size_t c = 0; c < NSMALL; c++, combo++)
        if (check_reduce(comm, t, op, small_counts[c], combo % n, c % 2))
          return 1;
    }
  /* every root on both algorithms (binomial below MC_RING_MIN_BYTES, ring + gather above) */
  static const size_t root_counts[] = {3, 1023, 100003};
  for (int root = 0; root < n; root++)
    for (size_t c = 0; c < 3; c++)
      if (check_reduce(comm, MC_FLOAT32, MC_SUM, root_counts[c], root, false) ||
          check_reduce(comm, MC_INT64, c % 2 ? MC_AVG : MC_BXOR, root_counts[c], root, true))
        return 1;
  return 0;
}

/* Gather and scatter: every root x dtype x count, in place every other time. */
static int test_gather(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int root = 0; root < n; root++)
    for (int t = 0; t < MC_DTYPE_COUNT; t++)
      for (size_t c = 0; c < NSMALL; c++) {
        size_t count = small_counts[c], bytes = count * mc_dtype_size(t);
        char *in = malloc(bytes + 1), *out = malloc(bytes * n + 1), *want = malloc(bytes * n + 1);
        fill(in, count, t, MC_SUM, me);
        for (int r = 0; r < n; r++)
          fill(want + r * bytes, count, t, MC_SUM, r);
        memset(out, 0x5a, bytes * n);
        bool inplace = me == root && (c + root) % 2;
        if (inplace)
          memcpy(out + root * bytes, in, bytes);
        mc_request_t *req;
        RUN_OK(req, mc_gather(comm, inplace ? out + root * bytes : in, me == root ? out : NULL,
                              count, t, root, &req));
        CHECK(me != root || !memcmp(out, want, bytes * n), "gather %s count %zu root %d: wrong",
              mc_dtype_name(t), count, root);
        free(in), free(out), free(want);
      }
  return 0;
}

static int test_scatter(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int root = 0; root < n; root++)
    for (int t = 0; t < MC_DTYPE_COUNT; t++)
      for (size_t c = 0; c < NSMALL; c++) {
        size_t count = small_counts[c], bytes = count * mc_dtype_size(t);
        char *in = malloc(bytes * n + 1), *out = malloc(bytes + 1), *want = malloc(bytes + 1);
        for (int r = 0; r < n; r++)
          fill(in + r * bytes, count, t, MC_SUM, r + 3);
        fill(want, count, t, MC_SUM, me + 3);
        memset(out, 0x5a, bytes);
        bool inplace = me == root && (c + root) % 2;
        mc_request_t *req;
        RUN_OK(req, mc_scatter(comm, me == root ? in : NULL, inplace ? in + root * bytes : out,
                               count, t, root, &req));
        CHECK(!memcmp(inplace ? in + root * bytes : out, want, bytes),
              "scatter %s count %zu root %d: wrong", mc_dtype_name(t), count, root);
        free(in), free(out), free(want);
      }
  return 0;
}

static int test_alltoall(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int t = 0; t < MC_DTYPE_COUNT; t++)
    for (size_t c = 0; c < NSMALL; c++) {
      size_t count = small_counts[c], bytes = count * mc_dtype_size(t);
      char *in = malloc(bytes * n + 1), *out = malloc(bytes * n + 1), *want = malloc(bytes * n + 1);
      for (int j = 0; j < n; j++) { /* block for rank j from rank r is fill(r * n + j) */
        fill(in + j * bytes, count, t, MC_SUM, me * n + j);
        fill(want + j * bytes, count, t, MC_SUM, j * n + me);
      }
      mc_request_t *req;
      RUN_OK(req, mc_alltoall(comm, in, out, count, t, &req));
      CHECK(!memcmp(out, want, bytes * n), "alltoall %s count %zu: wrong", mc_dtype_name(t), count);
      free(in), free(out), free(want);
    }
  return 0;
}

/* Elements rank `from` sends to rank `to` in pattern k: uneven, often zero. */
static size_t vcount(int from, int to, int k) {
  if ((from + 2 * to + k) % 4 == 0)
    return 0;
  size_t c = (size_t)(from * 5 + to * 3 + k) % 13;
  return k == 3 ? c * 2001 : c; /* pattern 3: large messages */
}

static int test_alltoallv(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  size_t *sc = calloc(n, sizeof *sc), *sd = calloc(n, sizeof *sd), *rc = calloc(n, sizeof *rc),
         *rd = calloc(n, sizeof *rd);
  for (int k = 0; k < 4; k++)
    for (int t = 0; t < MC_DTYPE_COUNT; t += (k == 3 ? 5 : 1)) {
      const size_t esz = mc_dtype_size(t);
      size_t send_total = 0, recv_total = 0;
      for (int j = 0; j < n; j++) { /* blocks in reverse rank order, with one-element gaps */
        int b = n - 1 - j;
        sc[b] = vcount(me, b, k), sd[b] = send_total, send_total += sc[b] + 1;
        rc[b] = vcount(b, me, k), rd[b] = recv_total, recv_total += rc[b] + (j % 2);
      }
      char *in = malloc(send_total * esz + 1), *out = malloc(recv_total * esz + 1),
           *want = malloc(recv_total * esz + 1);
      memset(in, 0x11, send_total * esz);
      memset(out, 0x5a, recv_total * esz);
      memset(want, 0x5a, recv_total * esz);
      for (int j = 0; j < n; j++) {
        fill(in + sd[j] * esz, sc[j], t, MC_SUM, me * n + j);
        fill(want + rd[j] * esz, rc[j], t, MC_SUM, j * n + me);
      }
      mc_request_t *req;
      RUN_OK(req, mc_alltoallv(comm, in, sc, sd, out, rc, rd, t, &req));
      CHECK(!memcmp(out, want, recv_total * esz), "alltoallv %s pattern %d: wrong (gaps included)",
            mc_dtype_name(t), k);
      free(in), free(out), free(want);
    }
  free(sc), free(sd), free(rc), free(rd);
  return 0;
}

/* PREMUL_SUM through allreduce, reduce_scatter and reduce; each rank has its own factor. */
static int test_premul(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  for (int t = 0; t < MC_DTYPE_COUNT; t++) {
    if (mc_reduce_supported(t, MC_PREMUL_SUM) != MC_OK)
      continue;
    for (size_t c = 0; c < NSMALL; c++) {
      size_t count = small_counts[c], esz = mc_dtype_size(t), bytes = count * esz;
      char *in = malloc(bytes * n + 1), *out = malloc(bytes * n + 1), *want = malloc(bytes * n + 1);
      mc_request_t *req;
      fill(in, count, t, MC_SUM, me);
      expected(want, count, t, MC_PREMUL_SUM, n);
      RUN_OK(req, mc_allreduce_premul(comm, in, out, count, t, premul_factor(me), &req));
      CHECK(!memcmp(out, want, bytes), "allreduce premul %s count %zu: wrong", mc_dtype_name(t),
            count);
      fill(in, count * n, t, MC_SUM, me);
      expected(want, count * n, t, MC_PREMUL_SUM, n);
      RUN_OK(req, mc_reduce_scatter_premul(comm, in, out, count, t, premul_factor(me), &req));
      CHECK(!memcmp(out, want + me * bytes, bytes), "reduce_scatter premul %s count %zu: wrong",
            mc_dtype_name(t), count);
      free(in), free(out), free(want);
      if (check_reduce(comm, t, MC_PREMUL_SUM, count, (int)(c % n), c % 2))
        return 1;
    }
  }
  return 0;
}

/* Ring exchange with tags, out-of-order tag posting, and receive from any source. */
static int test_p2p(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  const int right = (me + 1) % n, left = (me + n - 1) % n;
  int32_t a[100], b[100], ra[100], rb[100];
  for (int i = 0; i < 100; i++)
    a[i] = me * 1000 + i, b[i] = -(me * 1000 + i);
  mc_request_t *s1, *s2, *r1, *r2;
  /* receive tag 7 first but the sender sends tag 3 first: tags, not order, decide */
  CHECK(mc_recv(comm, rb, 100, MC_INT32, left, 7, &r2) == MC_OK, "%s", mc_last_error());
  CHECK(mc_recv(comm, ra, 100, MC_INT32, left, 3, &r1) == MC_OK, "%s", mc_last_error());
  CHECK(mc_send(comm, a, 100, MC_INT32, right, 3, &s1) == MC_OK, "%s", mc_last_error());
  CHECK(mc_send(comm, b, 100, MC_INT32, right, 7, &s2) == MC_OK, "%s", mc_last_error());
  mc_request_t *all[] = {s1, s2, r1, r2};
  for (int i = 0; i < 4; i++) {
    CHECK(mc_wait(all[i], 60000) == MC_OK, "p2p: %s", mc_request_error(all[i]));
  }
  CHECK(mc_request_source(r1) == left, "source %d", mc_request_source(r1));
  for (int i = 0; i < 100; i++)
    CHECK(ra[i] == left * 1000 + i && rb[i] == -(left * 1000 + i), "p2p data at %d", i);
  for (int i = 0; i < 4; i++)
    mc_request_free(all[i]);

  /* everyone sends to rank 0, which receives from any source */
  int32_t v = me * 11;
  if (me == 0) {
    int seen = 0;
    for (int k = 1; k < n; k++) {
      int32_t got;
      mc_request_t *r;
      CHECK(mc_recv(comm, &got, 1, MC_INT32, MC_ANY_SOURCE, 42, &r) == MC_OK, "%s",
            mc_last_error());
      CHECK(mc_wait(r, 60000) == MC_OK, "%s", mc_request_error(r));
      int src = mc_request_source(r);
      CHECK(src > 0 && src < n && got == src * 11, "any-source got %d from %d", got, src);
      seen |= 1 << src;
      mc_request_free(r);
    }
    CHECK(seen == ((1 << n) - 2), "any-source senders %x", seen);
  } else {
    mc_request_t *s;
    RUN_OK(s, mc_send(comm, &v, 1, MC_INT32, 0, 42, &s));
  }
  return 0;
}

/* Thousands of same-tag sends posted without waiting fill the transport's queues; messages
 * must still match receives in posting order. */
static int test_order(mc_comm_t *comm) {
  enum { MAX = 20000 };
  const int me = mc_comm_rank(comm), n = mc_comm_size(comm);
  /* shm 1.17 intermittently loses a message once thousands are unexpected at one receiver
   * (docs/transports.md): there, stay within its queues; tcp takes the full pressure test. */
  const int N = strcmp(mc_comm_transport(comm), "shm") ? MAX : 500;
  if (me > 1 || n < 2)
    return 0;
  static int32_t buf[MAX];
  static mc_request_t *reqs[MAX];
  for (int i = 0; i < N; i++) {
    buf[i] = me == 1 ? i : -1;
    mc_status_t st = me == 1 ? mc_send(comm, &buf[i], 1, MC_INT32, 0, 5, &reqs[i])
                             : mc_recv(comm, &buf[i], 1, MC_INT32, 1, 5, &reqs[i]);
    CHECK(st == MC_OK, "%s", mc_last_error());
  }
  for (int i = 0; i < N; i++) {
    CHECK(mc_wait(reqs[i], 60000) == MC_OK, "%s", mc_request_error(reqs[i]));
    mc_request_free(reqs[i]);
  }
  for (int i = 0; i < N; i++)
    CHECK(buf[i] == i, "message %d arrived as %d: posting order broken", i, buf[i]);
  return 0;
}

/* Many operations outstanding at once complete, each with the right data. */
static int test_outstanding(mc_comm_t *comm) {
  const int n = mc_comm_size(comm);
  enum { K = 16, C = 5000 };
  static float bufs[K][C];
  mc_request_t *reqs[K + 1];
  for (int k = 0; k < K; k++) {
    for (int i = 0; i < C; i++)
      bufs[k][i] = (float)(k + i % 7);
    CHECK(mc_allreduce(comm, bufs[k], bufs[k], C, MC_FLOAT32, MC_SUM, &reqs[k]) == MC_OK, "%s",
          mc_last_error());
  }
  CHECK(mc_barrier(comm, &reqs[K]) == MC_OK, "%s", mc_last_error());
  for (int k = K; k >= 0; k--) { /* waiting in reverse order must work too */
    CHECK(mc_wait(reqs[k], 60000) == MC_OK, "%s", mc_request_error(reqs[k]));
    mc_request_free(reqs[k]);
  }
  for (int k = 0; k < K; k++)
    for (int i = 0; i < C; i++)
      CHECK(bufs[k][i] == (float)(n * (k + i % 7)), "outstanding op %d elem %d", k, i);
  return 0;
}

/* 64 MiB: takes the large-message (single-copy where the provider can) path. */
static int test_large(mc_comm_t *comm) {
  const int n = mc_comm_size(comm), me = mc_comm_rank(comm);
  size_t count = 16u << 20;
  float *buf = malloc(count * sizeof *buf);
  for (size_t i = 0; i < count; i++)
    buf[i] = (float)((i + me) % 13);
  mc_request_t *req;
  RUN_OK(req, mc_allreduce(comm, buf, buf, count, MC_FLOAT32, MC_SUM, &req));
  for (size_t i = 0; i < count; i++) {
    float want = 0;
    for (int r = 0; r < n; r++)
      want += (float)((i + r) % 13);
    CHECK(buf[i] == want, "large allreduce elem %zu: %f != %f", i, buf[i], want);
  }
  free(buf);
  return 0;
}

static int body(mc_comm_t *comm, void *arg) {
  (void)arg;
  mc_request_t *req;
  RUN_OK(req, mc_barrier(comm, &req));
  const char *only = getenv("MC_TEST_ONLY"); /* e.g. "p2p" while debugging */
#define PART(name) ((!only || strstr(only, #name)) && test_##name(comm))
  if (PART(allreduce) || PART(reduce_scatter) || PART(allgather) || PART(broadcast) ||
      PART(reduce_to_root) || PART(gather) || PART(scatter) || PART(alltoall) || PART(alltoallv) ||
      PART(premul) || PART(p2p) || PART(outstanding) || PART(order) || PART(large))
    return 1;
  RUN_OK(req, mc_barrier(comm, &req));
  if (mc_comm_rank(comm) == 0)
    printf("rank 0 on %s: all collective checks passed\n", mc_comm_transport(comm));
  return 0;
}

int main(int argc, char **argv) {
  int size = argc > 1 ? atoi(argv[1]) : 4;
  int rc = mc_harness_run(size, body, NULL, 200);
  printf("test_collectives %d ranks (%s): %s\n", size,
         getenv("MC_TRANSPORT") ? getenv("MC_TRANSPORT") : "auto", rc ? "FAILED" : "passed");
  return rc;
}
