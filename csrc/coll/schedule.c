/* Runs an operation as a sequence of steps. A step is a set of sends and receives posted
 * together, then an optional local reduction once all of them are done. Algorithms
 * (algorithms.c) only describe steps; this file posts them, checks what arrives and decides
 * when the operation is complete. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "fault.h"
#include "internal.h"
#include "reduce.h"

/* signature (remote CQ data): | count:35 | root:15 | mismatch:1 | redop:4 | dtype:5 | kind:4 |
 * (mismatch: MC_SIG_MISMATCH). alltoallv leaves count 0: its per-peer sizes are checked by the
 * message lengths. */
static bool has_root(int kind) {
  return kind == MC_OP_BROADCAST || kind == MC_OP_REDUCE || kind == MC_OP_GATHER ||
         kind == MC_OP_SCATTER;
}

static bool reduces(int kind) {
  return kind == MC_OP_ALLREDUCE || kind == MC_OP_REDUCE_SCATTER || kind == MC_OP_REDUCE;
}

static uint64_t signature_of(const mc_request_t *req) {
  uint64_t root = has_root(req->kind) ? (uint64_t)req->root & 0x7fff : 0;
  uint64_t redop = reduces(req->kind) ? (uint64_t)req->redop : 0;
  uint64_t count = req->kind == MC_OP_ALLTOALLV ? 0 : (uint64_t)req->count & ((1ULL << 35) - 1);
  return count << 29 | root << 14 | redop << 9 | (uint64_t)req->dtype << 4 | (uint64_t)req->kind;
}

void mc_describe_signature(uint64_t sig, char *out, size_t len) {
  int kind = sig & 0xf, dtype = (sig >> 4) & 0x1f, redop = (sig >> 9) & 0xf;
  int root = (int)((sig >> 14) & 0x7fff);
  unsigned long long count = sig >> 29;
  int n =
      kind == MC_OP_ALLTOALLV /* sizes per peer: not in the signature */
          ? snprintf(out, len, "%s of %s", mc_op_name(kind), mc_dtype_name(dtype))
          : snprintf(out, len, "%s of %llu x %s", mc_op_name(kind), count, mc_dtype_name(dtype));
  if (n < 0 || (size_t)n >= len)
    return;
  if (reduces(kind))
    n += snprintf(out + n, len - n, " (%s)", mc_redop_name(redop));
  if (has_root(kind) && (size_t)n < len)
    snprintf(out + n, len - n, " %s root %d",
             kind == MC_OP_BROADCAST || kind == MC_OP_SCATTER ? "from" : "to", root);
}

uint64_t mc_tag(const mc_comm_t *comm, int src, bool p2p, uint32_t payload) {
  return (uint64_t)(comm->epoch & 0xff) << 52 | (comm->id & 0xff) << 44 |
         ((uint64_t)src & 0xffff) << MC_TAG_SRC_SHIFT | (p2p ? MC_TAG_P2P : 0) |
         (payload & 0x7ffffff);
}

void mc_step_add(mc_request_t *req, bool is_send, int peer, void *buf, size_t len) {
  mc_xfer_t *x = &req->xfers[req->nxfers++];
  memset(x, 0, sizeof *x);
  x->req = req;
  x->is_send = is_send;
  x->peer = req->grp_ranks && peer >= 0 ? req->grp_ranks[peer] : peer;
  x->buf = buf;
  x->len = len;
  x->wire_step = req->step;
}

static void mismatch(mc_request_t *req, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void mismatch(mc_request_t *req, const char *fmt, ...) {
  if (req->mismatch)
    return;
  req->mismatch = true;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(req->err, sizeof req->err, fmt, ap);
  va_end(ap);
}

/* A transfer failed: the other ranks are out of step with this one, so the communicator
 * breaks (closing the transport first) and then the request fails. */
static void fail_broken(mc_request_t *req, mc_status_t st, const char *why) {
  req->failed = true;
  mc_comm_break(req->comm, st, why);
  mc_request_complete(req, st, "%s", why);
}

static uint32_t wire_payload(const mc_request_t *req, const mc_xfer_t *x) {
  if (req->kind == MC_OP_SEND || req->kind == MC_OP_RECV)
    return req->seq; /* user tag */
  return (req->seq & 0xffff) << MC_STEP_BITS |
         ((x->wire_step + req->step_base) & ((1 << MC_STEP_BITS) - 1));
}

/* Posts whatever of the current step is not posted yet. A full queue leaves the rest for the
 * next pass of the progress loop. */
static void post_step(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  bool p2p = req->kind == MC_OP_SEND || req->kind == MC_OP_RECV;
  for (int i = 0; i < req->nxfers; i++) {
    mc_xfer_t *x = &req->xfers[i];
    if (x->posted)
      continue;
    if (!comm->transport)
      return; /* broken: the progress loop fails this request */
    bool *stalled = p2p ? &comm->p2p_stalled[x->is_send] : NULL;
    if (stalled && *stalled)
      return; /* an earlier p2p transfer is still waiting: keep posting order */
    uint32_t payload = wire_payload(req, x);
    mc_status_t st;
    if (x->is_send) {
      uint64_t data = p2p             ? (uint64_t)comm->rank
                      : req->mismatch ? req->signature | MC_SIG_MISMATCH
                                      : req->signature;
      st = comm->tops->send(comm->transport, x->peer, x->buf, x->len,
                            mc_tag(comm, p2p ? 0 : comm->rank, p2p, payload), data, &x->tctx);
    } else {
      st = comm->tops->recv(comm->transport, x->peer, x->buf, x->len,
                            mc_tag(comm, p2p ? 0 : x->peer, p2p, payload), &x->tctx);
    }
    MC_LOG(MC_LOG_TRACE, comm->rank, "%s #%u step %d: post %s %s %d, %zu bytes -> %s",
           mc_op_name(req->kind), req->seq, req->step, x->is_send ? "send" : "recv",
           x->is_send ? "to" : "from", x->peer, x->len, mc_status_str(st));
    if (st == MC_ERR_TIMEOUT) {
      if (stalled)
        *stalled = true;
      return; /* queue full: retry later */
    }
    if (st != MC_OK) {
      char why[MC_ERRLEN];
      snprintf(why, sizeof why, "rank %d: %s #%u on %s: posting a %s %s rank %d failed: %s",
               comm->rank, mc_op_name(req->kind), req->seq, comm->name,
               x->is_send ? "send" : "receive", x->is_send ? "to" : "from", x->peer,
               comm->tops->last_error(comm->transport));
      fail_broken(req, st, why);
      return;
    }
    x->posted = true;
  }
}

void mc_sched_finish(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  if (req->mismatch) {
    char msg[MC_ERRLEN];
    memcpy(msg, req->err, sizeof msg);
    mc_request_complete(req, MC_ERR_MISMATCH, "rank %d: %s #%u on %s: %s", comm->rank,
                        mc_op_name(req->kind), req->seq, comm->name, msg);
  } else {
    mc_comm_op_succeeded(comm); /* before the caller may destroy the communicator */
    mc_request_complete(req, MC_OK, NULL);
  }
}

/* MC_FAULT injection point at each step (fault.h); "error" breaks the communicator as a
 * failed link would. */
static bool fault_here(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  char step[16];
  snprintf(step, sizeof step, "%d", req->step);
  if (!mc_fault_point(comm->members[comm->rank], mc_op_name(req->kind), req->seq, step))
    return false;
  mc_comm_break(comm, MC_ERR_TRANSPORT, "injected transport error (MC_FAULT)");
  mc_request_complete(req, MC_ERR_TRANSPORT, "rank %d: %s #%u on %s: injected error (MC_FAULT)",
                      comm->rank, mc_op_name(req->kind), req->seq, comm->name);
  return true;
}

/* Moves to the next step that has transfers, running local-only steps on the way. */
static void advance(mc_request_t *req) {
  for (;;) {
    req->nxfers = 0;
    req->red_dst = NULL;
    req->red_base = NULL;
    if (!mc_algo_next_step(req)) {
      mc_sched_finish(req);
      return;
    }
    if (req->nxfers) {
      req->npending = req->nxfers;
      if (fault_here(req))
        return;
      post_step(req);
      return;
    }
    req->step++;
  }
}

void mc_sched_start(mc_request_t *req) {
  req->signature = signature_of(req);
  if (req->algo == MC_ALGO_DEFAULT) /* else set by the engine (creation's host barrier) */
    req->algo = mc_algo_choose(req);
  if (req->algo == MC_ALGO_HIER) { /* the progress loop runs it (coll/hier.c) */
    req->on_shm = req->comm->shm != NULL;
    return;
  }
  if (mc_algo_is_shm(req->algo)) {
    req->on_shm = true; /* the progress loop runs it (mc_shm_progress) */
    return;
  }
  mc_sched_run(req);
}

void mc_sched_run(mc_request_t *req) {
  req->step = 0;
  mc_algo_setup(req);
  if (atomic_load(&req->done))
    return; /* setup failed */
  advance(req);
}

void mc_sched_repost(mc_request_t *req) {
  if (!atomic_load(&req->done) && req->npending)
    post_step(req);
}

/* "4096 bytes (1024 x float32)": the element count too when the bytes are whole elements. */
static void describe_bytes(const mc_request_t *req, size_t bytes, char *out, size_t len) {
  size_t esize = mc_dtype_size(req->dtype);
  if (esize && bytes % esize == 0)
    snprintf(out, len, "%zu bytes (%zu x %s)", bytes, bytes / esize, mc_dtype_name(req->dtype));
  else
    snprintf(out, len, "%zu bytes", bytes);
}

static void check_arrival(mc_request_t *req, mc_xfer_t *x, const mc_completion_t *c) {
  int src = x->peer >= 0 ? x->peer : (int)c->data; /* any-source: p2p data is the sender */
  bool p2p = req->kind == MC_OP_RECV;
  if (p2p)
    req->source = src;
  /* collectives: the sender's signature says most (its op, count, dtype, root); a truncated
   * receive carries it too when the transport reports it (data 0: it did not) */
  if (!p2p && (c->status == MC_OK || c->data)) {
    if (c->data & MC_SIG_MISMATCH) {
      mismatch(req,
               "rank %d reported that the ranks called this operation with different "
               "arguments",
               src);
      return;
    }
    if (c->data != req->signature) {
      char theirs[128], mine[128];
      mc_describe_signature(c->data, theirs, sizeof theirs);
      mc_describe_signature(req->signature, mine, sizeof mine);
      mismatch(req, "rank %d called %s but this rank called %s", src, theirs, mine);
      return;
    }
  }
  char sent[96], expected[96];
  describe_bytes(req, x->len, expected, sizeof expected);
  if (c->status == MC_ERR_MISMATCH) { /* truncated: the sender had more */
    if (c->overflow) {
      describe_bytes(req, x->len + c->overflow, sent, sizeof sent);
      mismatch(req, "rank %d sent %s, this rank expected %s", src, sent, expected);
    } else {
      mismatch(req, "rank %d sent more than the %s this rank expected (%s)", src, expected,
               c->error ? c->error : "truncated");
    }
    return;
  }
  if (c->len != x->len) {
    describe_bytes(req, c->len, sent, sizeof sent);
    mismatch(req, "rank %d sent %s, this rank expected %s", src, sent, expected);
  }
}

void mc_sched_xfer_done(mc_xfer_t *x, const mc_completion_t *c) {
  mc_request_t *req = x->req;
  mc_comm_t *comm = req->comm;
  x->done = true;
  MC_LOG(MC_LOG_TRACE, comm->rank, "%s #%u step %d: %s %s %d done, %zu bytes, %s",
         mc_op_name(req->kind), req->seq, req->step, x->is_send ? "send" : "recv",
         x->is_send ? "to" : "from", x->peer, c->len, mc_status_str(c->status));
  if (atomic_load(&req->done))
    return; /* already failed; this drains a zombie */
  if (c->status != MC_OK && c->status != MC_ERR_MISMATCH) {
    char why[MC_ERRLEN];
    snprintf(why, sizeof why, "rank %d: %s #%u on %s: %s rank %d failed: %s", comm->rank,
             mc_op_name(req->kind), req->seq, comm->name, x->is_send ? "send to" : "receive from",
             x->peer, c->error ? c->error : "transport error");
    fail_broken(req, c->status == MC_ERR_TRANSPORT ? MC_ERR_PEER_FAILED : c->status, why);
    return;
  }
  if (!x->is_send)
    check_arrival(req, x, c);
  if (--req->npending)
    return;
  if (req->red_dst && req->red_base && !req->mismatch)
    memcpy(req->red_dst, req->red_base, req->red_count * mc_dtype_size(req->dtype));
  if (req->red_dst && !req->mismatch)
    mc_reduce_local(req->red_dst, req->red_src, req->red_count, req->dtype, req->redop);
  req->step++;
  advance(req);
}
