/* Hierarchical allreduce (barrier, broadcast, allgather and reduce_scatter at the end), for a
 * communicator whose ranks share hosts: the ranks of each host reduce into their leader (the host's
 * lowest rank) through shared memory, the leaders allreduce over the transport, and each leader
 * broadcasts the result to its host through shared memory. Each byte crosses a host boundary once
 * per leader instead of once per rank, and the ranks of one host do not talk to each other over
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
#include "reduce.h"
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
  switch (st->kind) {
  case MC_OP_ALLREDUCE: return "leaders' allreduce";
  case MC_OP_ALLTOALLV: return "leaders' exchange";
  case MC_OP_REDUCE: return "reduce to the host's leader";
  case MC_OP_GATHER: return "gather to the host's leader";
  case MC_OP_SCATTER: return "scatter from the host's leader";
  case MC_OP_BROADCAST:
    return st->grp_ranks ? "leaders' broadcast" : "broadcast from the host's leader";
  default: return st->grp_ranks ? "leaders' barrier" : "host's barrier";
  }
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

/* ---- broadcast, barrier, allgather, reduce_scatter: the same idea, without segments ----
 * Barrier: the host's ranks meet (shm), the leaders meet (dissemination), the host's ranks meet
 * again. Broadcast: the root stands in for its host's leader; these leaders broadcast from the
 * root's host (binomial), then each broadcasts to its host (shm). Allgather: the host gathers
 * to its leader, the leaders exchange their hosts' blocks (an all-to-all), each leader
 * broadcasts the whole result to its host. Reduce_scatter: the host reduces everything to its
 * leader, each leader sends every other leader the blocks of that leader's host and sums what
 * it gets for its own host's blocks, then scatters them to its host. A rank runs its stages
 * one after the other; a mismatch the leaders' stage finds marks the host's stage after it.
 *
 * The leaders exchange whole hosts' blocks: host h's ranks in rank order, after those of hosts
 * 0..h-1 ("host-major" order). When ranks are numbered host by host (torchrun's layout) that
 * is rank order and a leader works in place; otherwise it permutes through scratch space. */

enum { ST_SHM, ST_LEADERS, ST_END };

/* Stage i of this rank's sequence. The root's host has the data first: it broadcasts on the
 * host before (not after) the root sends to the other leaders. */
static int simple_stage(const mc_request_t *h, size_t i, bool leader) {
  const mc_comm_t *comm = h->comm;
  const bool shm = comm->shm != NULL, both = h->kind != MC_OP_BROADCAST;
  int seq[3], n = 0;
  bool shm_first = both || comm->host_of[comm->rank] == comm->host_of[h->root];
  if (shm_first && shm)
    seq[n++] = ST_SHM;
  if (leader)
    seq[n++] = ST_LEADERS;
  if (shm && (both || !shm_first))
    seq[n++] = ST_SHM;
  return i < (size_t)n ? seq[i] : ST_END;
}

/* Ranks on host h, and the first one's position in host-major order (comm.c set_locality). */
static size_t host_size(const mc_comm_t *comm, int h) {
  return (size_t)(comm->host_first[h + 1] - comm->host_first[h]);
}
static size_t host_first(const mc_comm_t *comm, int h) { return (size_t)comm->host_first[h]; }

static size_t block_bytes(const mc_request_t *h) { return h->count * mc_dtype_size(h->dtype); }
static size_t all_bytes(const mc_request_t *h) { return (size_t)h->comm->size * block_bytes(h); }

/* A leader's blocks in host-major order: an allgather's output itself or scratch; for a
 * reduce_scatter, its host's sum (scratch, rank order) or scratch after that sum. The scratch
 * is the communicator's, kept from one operation to the next (one runs at a time): fresh pages
 * of a new allocation cost more to fault in than the copies into them (docs/performance.md). */
static char *major_buf(const mc_request_t *h) {
  bool in_place = h->comm->host_major;
  if (h->kind == MC_OP_ALLGATHER)
    return in_place ? h->out : h->hier.scratch;
  return in_place || !h->comm->shm ? h->hier.scratch : h->hier.scratch + all_bytes(h);
}

/* A reduce_scatter leader receives the other hosts' partial sums of its host's blocks here:
 * nhosts - 1 slots of local_ranks blocks, in host order without its own host. */
static size_t recv_slot(const mc_comm_t *comm, int g) {
  return (size_t)(g < comm->host_of[comm->rank] ? g : g - 1) * comm->local_ranks;
}
static char *recv_buf(const mc_request_t *h) { return major_buf(h) + all_bytes(h); }

static size_t scratch_bytes(const mc_request_t *h) {
  const mc_comm_t *comm = h->comm;
  if (h->kind == MC_OP_ALLGATHER)
    return comm->host_major ? 0 : all_bytes(h);
  size_t before = comm->host_major || !comm->shm ? 0 : all_bytes(h);
  return before + all_bytes(h) + (size_t)(comm->nhosts - 1) * comm->local_ranks * block_bytes(h);
}

/* Copies the blocks between rank order and host-major order; `load` applies a reduce_scatter's
 * PREMUL_SUM factor on the way (a rank alone on its host: its input is the host's sum). */
static void permute(const mc_request_t *h, char *ranked, char *major, bool to_major, bool load) {
  const mc_comm_t *comm = h->comm;
  const size_t blk = block_bytes(h);
  for (int r = 0; r < comm->size; r++) {
    char *a = ranked + r * blk, *b = major + (size_t)comm->major_pos[r] * blk;
    if (!to_major)
      mc_copy(a, b, blk);
    else if (load)
      mc_load_input(h, b, a, h->count);
    else
      mc_copy(b, a, blk);
  }
}

/* The shm stage before (first) or after the leaders' exchange, shaped for h's kind. */
static mc_request_t *shm_stage_new(mc_request_t *h, bool first, bool leader, int root) {
  mc_comm_t *comm = h->comm;
  const size_t mine = host_first(comm, comm->host_of[comm->rank]) * block_bytes(h);
  const size_t all = (size_t)comm->size * h->count;
  mc_op_kind_t kind = h->kind;
  if (kind == MC_OP_ALLGATHER)
    kind = first ? MC_OP_GATHER : MC_OP_BROADCAST;
  if (kind == MC_OP_REDUCE_SCATTER)
    kind = first ? MC_OP_REDUCE : MC_OP_SCATTER;
  mc_request_t *st = stage_new(h, kind, 0);
  if (!st)
    return NULL;
  if (kind == MC_OP_GATHER && leader) /* the host's blocks, in place among all */
    st->out = major_buf(h) + mine;
  if (kind == MC_OP_BROADCAST && h->kind == MC_OP_ALLGATHER) {
    st->count = all;
    st->in = st->out;
  }
  if (kind == MC_OP_REDUCE) {
    st->count = all;
    st->out = leader ? h->hier.scratch : NULL; /* only the leader's is written */
  }
  if (kind == MC_OP_SCATTER && leader)
    st->in = major_buf(h) + mine;
  /* AVG: the leaders divide by the communicator's size; only a reduce applies PREMUL_SUM (and
   * it would keep the others off the single copy) */
  if (st->redop == MC_AVG || kind != MC_OP_REDUCE)
    st->redop = MC_SUM;
  st->refs = 1; /* h's only: the shm path runs it through h */
  st->algo = MC_ALGO_SHM;
  st->on_shm = true;
  st->root = root;
  return st;
}

/* The leaders' all-to-all of an allgather or reduce_scatter (element counts and offsets). */
static mc_request_t *exchange_new(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  const int hosts = comm->nhosts, me = comm->host_of[comm->rank];
  const size_t c = h->count, mine = comm->local_ranks * c;
  mc_request_t *st = stage_new(h, MC_OP_ALLTOALLV, 0);
  if (!st)
    return NULL;
  size_t *v = st->vcounts = calloc(4 * (size_t)hosts, sizeof *v);
  if (!v) {
    st->refs = 1; /* not handed to the engine */
    mc_request_release(st);
    fail(h, MC_ERR_NOMEM, "its leaders' exchange: out of memory");
    return NULL;
  }
  st->in = st->out = major_buf(h);
  for (int g = 0; g < hosts; g++) { /* send count, send offset, receive count, receive offset */
    if (g == me)
      continue;
    size_t theirs = host_size(comm, g) * c, first = host_first(comm, g) * c;
    if (h->kind == MC_OP_ALLGATHER) { /* my host's blocks to all; theirs into place */
      v[g] = mine, v[hosts + g] = host_first(comm, me) * c;
      v[2 * hosts + g] = theirs, v[3 * hosts + g] = first;
    } else { /* their host's partial sums to them; mine from each into its slot */
      v[g] = theirs, v[hosts + g] = first;
      v[2 * hosts + g] = mine, v[3 * hosts + g] = recv_slot(comm, g) * c;
    }
  }
  if (h->kind == MC_OP_REDUCE_SCATTER)
    st->out = recv_buf(h);
  return st;
}

/* A leader's work between its host's stage and the leaders' exchange (before) or after it. */
static void leader_local(mc_request_t *h, bool before) {
  mc_comm_t *comm = h->comm;
  const bool alone = !comm->shm, in_place = comm->host_major;
  const int hosts = comm->nhosts, me = comm->host_of[comm->rank];
  char *major = major_buf(h), *mine = major + host_first(comm, me) * block_bytes(h);
  if (h->mismatch || (h->kind != MC_OP_ALLGATHER && h->kind != MC_OP_REDUCE_SCATTER))
    return;
  if (h->kind == MC_OP_ALLGATHER && before && alone && mine != h->in)
    mc_copy(mine, h->in, block_bytes(h));
  if (h->kind == MC_OP_ALLGATHER && !before && !in_place)
    permute(h, h->out, major, false, false);
  if (h->kind == MC_OP_REDUCE_SCATTER && before && (alone || !in_place))
    permute(h, alone ? (char *)h->in : h->hier.scratch, major, true, alone);
  if (h->kind == MC_OP_REDUCE_SCATTER && !before) { /* mine op= each other host's */
    const size_t count = comm->local_ranks * h->count;
    const void *srcs[16] = {mine};
    for (int g = 0; g < hosts;) {
      int n = 1;
      for (; g < hosts && n < 16; g++)
        if (g != me)
          srcs[n++] = recv_buf(h) + recv_slot(comm, g) * block_bytes(h);
      if (n > 1) /* AVG and PREMUL_SUM sum here */
        mc_reduce_many(mine, srcs, n, count, h->dtype, h->redop);
    }
    if (h->redop == MC_AVG)
      mc_scale_div(mine, count, h->dtype, comm->size);
    if (alone)
      mc_copy(h->out, mine, block_bytes(h));
  }
}

static bool advance_simple(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  const int me = comm->rank, host = comm->host_of[me];
  const bool blocks = h->kind == MC_OP_ALLGATHER || h->kind == MC_OP_REDUCE_SCATTER;
  /* the root leads its host in a broadcast: a copy of the leaders only when it is not already
   * its host's lowest rank */
  bool own = h->kind == MC_OP_BROADCAST && comm->leaders[comm->host_of[h->root]] != h->root;
  if (!h->hier.segs) {
    size_t bytes = own ? (size_t)comm->nhosts * sizeof(int) : 0;
    if (own && !(h->tmp = malloc(bytes))) {
      fail(h, MC_ERR_NOMEM, "its set-up: out of memory");
      return true;
    }
    if (blocks && comm->leaders[host] == me && (bytes = scratch_bytes(h)) > comm->scratch_bytes) {
      free(comm->scratch);
      comm->scratch_bytes = (comm->scratch = malloc(bytes)) ? bytes : 0;
      if (!comm->scratch) {
        fail(h, MC_ERR_NOMEM, "its set-up: out of memory for scratch space");
        return true;
      }
    }
    h->hier.scratch = comm->scratch;
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
    size_t i = h->hier.shm_started;
    int next = simple_stage(h, i, leader);
    if (blocks && leader && i > 0 && simple_stage(h, i - 1, leader) == ST_LEADERS)
      leader_local(h, false);
    if (blocks && next == ST_LEADERS)
      leader_local(h, true);
    if (next == ST_END) {
      finish(h);
      return true;
    }
    h->hier.shm_started++;
    if (next == ST_SHM) {
      int root = 0; /* the host's leader, in the host's group */
      for (int r = 0; r < comm->local_ranks; r++)
        if (comm->local[r] == leaders[host])
          root = r;
      if (!(h->hier.shm = shm_stage_new(h, i == 0, leader, root)))
        return true;
      continue;
    }
    if (!(st = blocks ? exchange_new(h) : stage_new(h, h->kind, 0)))
      return true;
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
