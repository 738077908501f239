/* Hierarchical allreduce (barrier and broadcast at the end), for a communicator whose ranks
 * share hosts: the ranks of each host reduce into their leader (the host's lowest rank)
 * through shared memory, the leaders allreduce over the transport, and each leader broadcasts
 * the result to its host through shared memory. Each byte crosses a host boundary once per
 * leader instead of once per rank, and the ranks of one host do not talk to each other over
 * loopback TCP.
 *
 * Pipelined when MC_HIER_SEGMENT_BYTES is set: a larger operation is cut into segments, and the
 * host's shm stages of one segment run while the leaders exchange another. Every stage is a
 * request of its own (kind reduce, allreduce over the leaders, broadcast) carrying the
 * operation's sequence number, signature and deadline. The operation keeps its place at the
 * head of the shm path until its last stage, and every rank of a host runs the shm stages in
 * one fixed order: reduce 0, then reduce k and broadcast k-1 for k = 1, 2, ..., then the last
 * broadcast (a leader starts broadcast k once the leaders have exchanged segment k). The
 * leaders exchange one segment at a time, so a leader is at most one segment ahead of another:
 * the segment's parity picks one half of the tag's step numbers (step_base), and two segments
 * in flight never share a tag. A rank alone on its host runs the leaders' stages only, from
 * its input (mc_hier_progress drives it, as it has no shm path).
 *
 * Ranks whose arguments differ (and so may not even agree on the number of segments): the
 * signatures of the first segment's stages tell. The host's reduce 0 shows a difference on a
 * host to all its ranks; the leaders' allreduce 0 carries it (MC_SIG_MISMATCH) to every leader
 * and shows a difference between leaders; a leader starts its second shm stage only after
 * that, and marks it, so every rank of every host knows after its second shm stage. A rank
 * that knows runs no further stage (later stages carry the mark, and a marked shm stage gives
 * up after one chunk on every rank of the host, flags in step): the operation fails with
 * MC_ERR_MISMATCH everywhere and the communicator stays usable, as with the flat algorithms.
 * Any other failure of a stage revokes the communicator on every rank: the other hosts would
 * otherwise wait for this one until their timeout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "shm.h"

/* Step numbers a segment's leaders' allreduce may use: half of those the tag has. */
#define SEGMENT_STEPS (1 << (MC_STEP_BITS - 1))

typedef struct {
  size_t off, count; /* elements */
} seg_t;

static seg_t segment(const mc_request_t *h, size_t k) {
  seg_t s = {k * h->hier.seg_elems, 0};
  s.count = h->count > s.off ? h->count - s.off : 0;
  if (s.count > h->hier.seg_elems)
    s.count = h->hier.seg_elems;
  return s;
}

/* The same on every rank that called the same operation (count, dtype, the parameter and the
 * number of hosts are). */
static void plan(mc_request_t *h) {
  size_t esz = mc_dtype_size(h->dtype);
  size_t elems = (size_t)mc_param_int(MC_PARAM_HIER_SEGMENT_BYTES) / esz;
  bool fits = 2 * (h->comm->nhosts - 1) < SEGMENT_STEPS; /* the ring's steps */
  if (!elems || !fits || h->count <= elems) {
    h->hier.segs = 1;
    h->hier.seg_elems = h->count ? h->count : 1;
  } else {
    h->hier.segs = (h->count + elems - 1) / elems;
    h->hier.seg_elems = elems;
  }
  if (!h->comm->shm) /* alone on this host: its input is the host's sum */
    h->hier.reduced = h->hier.segs;
}

/* The host's shm stage number j in the order every rank of the host runs them; *k is its
 * segment. True for a reduce, false for a broadcast. */
static bool shm_stage(const mc_request_t *h, size_t j, size_t *k) {
  if (j % 2 == 0 && j > 0) {
    *k = j / 2 - 1;
    return false;
  }
  *k = (j + 1) / 2;
  if (*k < h->hier.segs)
    return true;
  *k = h->hier.segs - 1;
  return false;
}

static const char *stage_name(const mc_request_t *st) {
  if (st->grp_ranks)
    return st->kind == MC_OP_ALLREDUCE   ? "leaders' allreduce"
           : st->kind == MC_OP_BROADCAST ? "leaders' broadcast"
                                         : "leaders' barrier";
  return st->kind == MC_OP_REDUCE      ? "reduce to the host's leader"
         : st->kind == MC_OP_BROADCAST ? "broadcast from the host's leader"
                                       : "host's barrier";
}

static size_t segment_of(const mc_request_t *h, const mc_request_t *st) {
  size_t bytes = (size_t)((const char *)st->out - (const char *)h->out);
  return bytes / mc_dtype_size(h->dtype) / h->hier.seg_elems;
}

/* Why stage st failed: "its reduce to the host's leader stage (segment 2 of 8): <cause>". */
static void describe(const mc_request_t *h, const mc_request_t *st, char *out, size_t len) {
  char seg[48] = "";
  if (h->hier.segs > 1)
    snprintf(seg, sizeof seg, " (segment %zu of %zu)", segment_of(h, st) + 1, h->hier.segs);
  snprintf(out, len, "its %s stage%s: %.800s", stage_name(st), seg, st->err);
}

static void fail(mc_request_t *h, mc_status_t st, const char *cause) {
  mc_comm_t *comm = h->comm;
  char why[MC_ERRLEN];
  snprintf(why, sizeof why, "rank %d: %s #%u on %s failed in %.900s", comm->rank,
           mc_op_name(h->kind), h->seq, comm->name, cause);
  mc_status_t broke = st == MC_ERR_MISMATCH ? MC_ERR_REVOKED : st;
  mc_comm_break(comm, broke, why);
  mc_ctrl_revoke(comm->ctrl, comm->epoch, why); /* also when this rank was not the first */
  mc_shm_leave(comm, broke, why);
  mc_request_complete(h, st, "%s", why);
}

/* A mismatch is carried on (later stages tell the other ranks) only while the communicator
 * works (ranks out of step revoke it: shm.c in_step), and, for a pipelined allreduce, only
 * where the protocol above guarantees every rank learns it in time: in the first leaders'
 * exchange or the first two shm stages. Later (it cannot happen while signatures cover count,
 * dtype and op), the operation fails and revokes rather than leave a host's ranks apart. */
static bool mismatch_carried(const mc_request_t *h, const mc_request_t *st) {
  mc_comm_t *comm = h->comm;
  pthread_mutex_lock(&comm->lock);
  bool broken = comm->broken != MC_OK;
  pthread_mutex_unlock(&comm->lock);
  if (broken || h->kind != MC_OP_ALLREDUCE)
    return !broken;
  return st->grp_ranks ? segment_of(h, st) == 0 : h->hier.shm_started <= 2;
}

/* False if stage st failed, and h with it. */
static bool stage_ok(mc_request_t *h, const mc_request_t *st) {
  char cause[MC_ERRLEN];
  if (st->status == MC_OK)
    return true;
  describe(h, st, cause, sizeof cause);
  if (st->status == MC_ERR_MISMATCH && (h->mismatch || mismatch_carried(h, st))) {
    if (!h->mismatch) { /* the first stage to see it explains it */
      h->mismatch = true;
      snprintf(h->err, sizeof h->err, "rank %d: %s #%u on %s: %.900s", h->comm->rank,
               mc_op_name(h->kind), h->seq, h->comm->name, cause);
    }
    return true;
  }
  fail(h, st->status, cause);
  return false;
}

/* Stage `kind` of segment k, or NULL (h has failed). */
static mc_request_t *stage_new(mc_request_t *h, mc_op_kind_t kind, size_t k) {
  seg_t s = segment(h, k);
  size_t esz = mc_dtype_size(h->dtype);
  mc_request_t *st = mc_request_new(h->comm, kind);
  if (!st) {
    fail(h, MC_ERR_NOMEM, "a stage: out of memory");
    return NULL;
  }
  st->seq = h->seq;
  st->signature = h->signature | (h->mismatch ? MC_SIG_MISMATCH : 0);
  st->deadline_ns = h->deadline_ns;
  st->in = s.count ? (const char *)h->in + s.off * esz : h->in;
  st->out = s.count ? (char *)h->out + s.off * esz : h->out;
  st->count = s.count;
  st->dtype = h->dtype;
  st->redop = h->redop;
  st->factor = h->factor;
  return st;
}

static bool start_shm(mc_request_t *h, bool reduce, size_t k) {
  mc_request_t *st = stage_new(h, reduce ? MC_OP_REDUCE : MC_OP_BROADCAST, k);
  if (!st)
    return false;
  if (st->redop == MC_AVG || !reduce) /* the leaders' stage divides by the communicator's size;
                                         a broadcast reduces nothing (PREMUL_SUM would keep it
                                         off the single copy) */
    st->redop = MC_SUM;
  if (!reduce)
    st->in = st->out;
  st->refs = 1; /* h's only: the shm path runs it through h */
  st->algo = MC_ALGO_SHM;
  st->on_shm = true;
  st->root = 0; /* the leader, numbered within the host's group */
  h->hier.shm = st;
  return true;
}

static bool start_leaders(mc_request_t *h, size_t k) {
  mc_comm_t *comm = h->comm;
  mc_request_t *st = stage_new(h, MC_OP_ALLREDUCE, k);
  if (!st)
    return false;
  if (comm->shm) { /* the host's reduce left the host's sum in out, scaled for PREMUL_SUM */
    st->in = st->out;
    if (st->redop == MC_PREMUL_SUM)
      st->redop = MC_SUM;
  }
  if (h->mismatch) { /* the other leaders learn it from the signature */
    st->mismatch = true;
    snprintf(st->err, sizeof st->err, "this host's ranks called it with different arguments");
  }
  st->grp_ranks = comm->leaders;
  st->grp_me = comm->host_of[comm->rank];
  st->grp_n = comm->nhosts;
  st->step_base = (int)(k & 1) * SEGMENT_STEPS;
  st->algo = mc_algo_choose(st);
  h->hier.leaders = st;
  mc_progress_adopt(comm, st); /* the active list holds the engine's reference */
  return true;
}

static void finish(mc_request_t *h) {
  char why[MC_ERRLEN];
  memcpy(why, h->err, sizeof why); /* completing writes h->err */
  if (h->mismatch)
    mc_request_complete(h, MC_ERR_MISMATCH, "%s", why);
  else
    mc_sched_finish(h);
}

static bool advance_allreduce(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  const bool leader = comm->rank == comm->local[0];
  bool moved = false;
  if (!h->hier.segs)
    plan(h);
  while (!atomic_load(&h->done)) {
    bool stepped = false;
    mc_request_t *st = h->hier.shm;
    if (st && !atomic_load(&st->done))
      moved |= mc_shm_run(comm, st);
    if (st && atomic_load(&st->done)) {
      if (!stage_ok(h, st))
        return true;
      h->hier.reduced += st->kind == MC_OP_REDUCE;
      mc_request_release(st);
      h->hier.shm = NULL;
      stepped = true;
    }
    if ((st = h->hier.leaders) && atomic_load(&st->done)) {
      if (!stage_ok(h, st))
        return true;
      h->hier.exchanged++;
      mc_request_release(st);
      h->hier.leaders = NULL;
      stepped = true;
    }
    /* a mismatch ends the stages once every rank knows: after the leaders' first, and after
     * the host's second */
    size_t leader_stages = h->mismatch ? 1 : h->hier.segs;
    size_t shm_stages = h->mismatch ? 2 : 2 * h->hier.segs;
    /* the leaders exchange a segment once the host has reduced it, one segment at a time */
    if (leader && !h->hier.leaders && h->hier.exchanged < h->hier.reduced &&
        h->hier.exchanged < leader_stages) {
      if (!start_leaders(h, h->hier.exchanged))
        return true;
      stepped = true;
    }
    /* the host's next shm stage; a leader goes past the first only once the leaders have
     * exchanged segment 0 (and would mark a mismatch), and broadcasts only what they exchanged */
    size_t k;
    if (comm->shm && !h->hier.shm && h->hier.shm_started < shm_stages) {
      bool reduce = shm_stage(h, h->hier.shm_started, &k);
      if (!leader || h->hier.shm_started == 0 || h->hier.exchanged > (reduce ? 0 : k)) {
        if (!start_shm(h, reduce, k))
          return true;
        h->hier.shm_started++;
        stepped = true;
      }
    }
    bool host_done = !comm->shm || (h->hier.shm_started >= shm_stages && !h->hier.shm);
    if (host_done && (!leader || h->hier.exchanged >= leader_stages)) {
      finish(h);
      return true;
    }
    if (!stepped)
      return moved;
    moved = true;
  }
  return true;
}

/* ---- broadcast and barrier: the same idea, without segments ----
 * Barrier: the host's ranks meet (shm), the leaders meet (dissemination), the host's ranks meet
 * again. Broadcast: the root stands in for its host's leader; these leaders broadcast from the
 * root's host (binomial), then each broadcasts to its host (shm). A rank runs its stages one
 * after the other; a mismatch the leaders' stage finds marks the host's stage after it. */

enum { ST_SHM, ST_LEADERS, ST_END };

/* Stage i of this rank's sequence. The root's host has the data first: it broadcasts on the
 * host before (not after) the root sends to the other leaders. */
static int simple_stage(const mc_request_t *h, size_t i, bool leader) {
  const mc_comm_t *comm = h->comm;
  const bool shm = comm->shm != NULL;
  int seq[3], n = 0;
  bool shm_first = h->kind == MC_OP_BARRIER || comm->host_of[comm->rank] == comm->host_of[h->root];
  if (shm_first && shm)
    seq[n++] = ST_SHM;
  if (leader)
    seq[n++] = ST_LEADERS;
  if (shm && (h->kind == MC_OP_BARRIER || !shm_first))
    seq[n++] = ST_SHM;
  return i < (size_t)n ? seq[i] : ST_END;
}

static bool advance_simple(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  const int me = comm->rank, host = comm->host_of[me];
  /* the root leads its host in a broadcast: a copy of the leaders only when it is not already
   * its host's lowest rank */
  bool own = h->kind == MC_OP_BROADCAST && comm->leaders[comm->host_of[h->root]] != h->root;
  if (!h->hier.segs) {
    if (own && !(h->tmp = malloc((size_t)comm->nhosts * sizeof(int)))) {
      fail(h, MC_ERR_NOMEM, "its set-up: out of memory");
      return true;
    }
    if (own) {
      memcpy(h->tmp, comm->leaders, (size_t)comm->nhosts * sizeof(int));
      ((int *)h->tmp)[comm->host_of[h->root]] = h->root;
    }
    h->hier.segs = 1;
    h->hier.seg_elems = h->count ? h->count : 1;
  }
  const int *leaders = own ? h->tmp : comm->leaders;
  const bool leader = leaders[host] == me;
  bool moved = false;
  while (!atomic_load(&h->done)) {
    mc_request_t *st = h->hier.shm ? h->hier.shm : h->hier.leaders;
    if (st && st->on_shm && !atomic_load(&st->done))
      moved |= mc_shm_run(comm, st);
    if (st && !atomic_load(&st->done))
      return moved;
    if (st) {
      if (!stage_ok(h, st))
        return true;
      mc_request_release(st);
      h->hier.shm = h->hier.leaders = NULL;
    }
    moved = true;
    int next = simple_stage(h, h->hier.shm_started, leader);
    if (next == ST_END) {
      finish(h);
      return true;
    }
    st = stage_new(h, h->kind, 0);
    if (!st)
      return true;
    h->hier.shm_started++;
    if (next == ST_SHM) {
      st->refs = 1; /* h's only: the shm path runs it through h */
      st->algo = MC_ALGO_SHM;
      st->on_shm = true;
      for (int i = 0; i < comm->local_ranks; i++) /* the host's leader, in the host's group */
        if (comm->local[i] == leaders[host])
          st->root = i;
      h->hier.shm = st;
    } else {
      if (h->mismatch) {
        st->mismatch = true;
        snprintf(st->err, sizeof st->err, "this host's ranks called it with different arguments");
      }
      st->grp_ranks = leaders;
      st->grp_me = host;
      st->grp_n = comm->nhosts;
      st->root = comm->host_of[h->root];
      st->algo = mc_algo_choose(st);
      h->hier.leaders = st;
      mc_progress_adopt(comm, st);
    }
  }
  return true;
}

bool mc_hier_advance(mc_request_t *h) {
  return h->kind == MC_OP_ALLREDUCE ? advance_allreduce(h) : advance_simple(h);
}

bool mc_hier_progress(mc_comm_t *comm) {
  for (mc_request_t *req = comm->active_head; req; req = req->next)
    if (req->algo == MC_ALGO_HIER && !atomic_load(&req->done))
      return mc_hier_advance(req);
  return false;
}
