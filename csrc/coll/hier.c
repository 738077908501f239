/* Hierarchical allreduce, for a communicator whose ranks share hosts: the ranks of each host
 * reduce into their leader (the host's lowest rank) through shared memory, the leaders
 * allreduce over the transport, and each leader broadcasts the result to its host through
 * shared memory. Each byte crosses a host boundary once per leader instead of once per rank,
 * and the ranks of one host do not talk to each other over loopback TCP.
 *
 * Each stage is a request of its own (kind reduce, allreduce over the leaders, broadcast) that
 * carries the operation's sequence number and signature; the operation keeps its place on the
 * shm path through all three, so the ranks of a host run their stages in the same order. A
 * rank alone on its host runs the leaders' stage only, as the operation itself
 * (mc_hier_leaders_only).
 *
 * Ranks whose arguments differ: the stage that sees it (the host's reduce, or the leaders'
 * allreduce) completes with a mismatch, and the later stages carry MC_SIG_MISMATCH in their
 * signature, so every rank of every host learns it and gives up after one chunk, with the
 * flags in step; the communicator stays usable, as with the flat algorithms. Any other failure
 * of a stage revokes the communicator on every rank: the other hosts would otherwise wait for
 * this one until their timeout. */
#include "internal.h"
#include "shm.h"
#include <stdio.h>
#include <string.h>

enum { ST_NONE, ST_REDUCE, ST_LEADERS, ST_BROADCAST, ST_DONE };

static const char *stage_name(int stage) {
  return stage == ST_REDUCE    ? "reduce to the host's leader"
         : stage == ST_LEADERS ? "leaders' allreduce"
                               : "broadcast from the host's leader";
}

static void view_leaders(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  req->grp_ranks = comm->leaders;
  req->grp_me = comm->host_of[comm->rank];
  req->grp_n = comm->nhosts;
}

void mc_hier_leaders_only(mc_request_t *req) {
  view_leaders(req);
  req->algo = mc_algo_choose(req);
}

/* A stage of h: the same sequence number, signature and deadline, so that a mismatch or a
 * timeout names the operation the ranks called. */
static mc_request_t *stage_new(mc_request_t *h, mc_op_kind_t kind, const void *in) {
  mc_request_t *st = mc_request_new(h->comm, kind);
  if (!st)
    return NULL;
  st->seq = h->seq;
  st->signature = h->signature | (h->mismatch ? MC_SIG_MISMATCH : 0);
  st->deadline_ns = h->deadline_ns;
  st->in = in;
  st->out = h->out;
  st->count = h->count;
  st->dtype = h->dtype;
  st->redop = h->redop;
  st->factor = h->factor;
  return st;
}

/* Creates and starts stage `stage` of h; false if out of memory (h has failed). */
static bool start_stage(mc_request_t *h, int stage) {
  mc_comm_t *comm = h->comm;
  mc_request_t *st = NULL;
  switch (stage) {
  case ST_REDUCE:
    if ((st = stage_new(h, MC_OP_REDUCE, h->in))) {
      if (st->redop == MC_AVG) /* the leaders' stage divides by the communicator's size */
        st->redop = MC_SUM;
    }
    break;
  case ST_LEADERS:
    if ((st = stage_new(h, MC_OP_ALLREDUCE, h->out))) {
      if (st->redop == MC_PREMUL_SUM) /* the host's stage scaled the inputs */
        st->redop = MC_SUM;
      if (h->mismatch) { /* the other leaders learn it from the signature */
        st->mismatch = true;
        snprintf(st->err, sizeof st->err, "this host's ranks called it with different arguments");
      }
      view_leaders(st);
      st->algo = mc_algo_choose(st);
    }
    break;
  default: st = stage_new(h, MC_OP_BROADCAST, h->out); break;
  }
  if (!st) {
    mc_comm_revoke_local(comm, MC_ERR_NOMEM, "out of memory for a hierarchical stage");
    mc_shm_leave(comm, MC_ERR_NOMEM, "out of memory");
    mc_request_complete(h, MC_ERR_NOMEM, "rank %d: allreduce #%u on %s: out of memory", comm->rank,
                        h->seq, comm->name);
    return false;
  }
  if (h->stage)
    mc_request_release(h->stage);
  h->stage = st;
  h->hier_stage = stage;
  if (stage == ST_LEADERS) {
    mc_progress_adopt(comm, st); /* the active list holds the engine's reference */
  } else {
    st->refs = 1; /* h's only: the shm path runs it through h */
    st->algo = MC_ALGO_SHM;
    st->on_shm = true;
    st->root = 0; /* the leader, numbered within the host's group */
  }
  return true;
}

static void fail_stage(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  const mc_request_t *st = h->stage;
  char why[MC_ERRLEN];
  snprintf(why, sizeof why, "rank %d: allreduce #%u on %s failed in its %s stage: %.850s",
           comm->rank, h->seq, comm->name, stage_name(h->hier_stage), st->err);
  mc_status_t broke = st->status == MC_ERR_MISMATCH ? MC_ERR_REVOKED : st->status;
  mc_comm_break(comm, broke, why);
  mc_ctrl_revoke(comm->ctrl, comm->epoch, why); /* also when this rank was not the first */
  mc_shm_leave(comm, broke, why);
  mc_request_complete(h, st->status, "%s", why);
}

bool mc_hier_advance(mc_request_t *h) {
  mc_comm_t *comm = h->comm;
  bool moved = false;
  while (!atomic_load(&h->done)) {
    mc_request_t *st = h->stage;
    if (st && st->on_shm && !atomic_load(&st->done))
      moved |= mc_shm_run(comm, st);
    if (st && !atomic_load(&st->done))
      return moved; /* the leaders' stage moves with its transfers */
    moved = true;
    if (st && st->status == MC_ERR_MISMATCH && !h->mismatch) {
      h->mismatch = true; /* the first stage to see it explains it */
      snprintf(h->err, sizeof h->err, "rank %d: allreduce #%u on %s: its %s stage: %.850s",
               comm->rank, h->seq, comm->name, stage_name(h->hier_stage), st->err);
    } else if (st && st->status != MC_OK && st->status != MC_ERR_MISMATCH) {
      fail_stage(h);
      return true;
    }
    int next = h->hier_stage + 1;
    if (next == ST_LEADERS && comm->rank != comm->local[0])
      next++; /* not the leader: wait for its broadcast */
    if (next == ST_DONE) {
      char why[MC_ERRLEN];
      memcpy(why, h->err, sizeof why); /* completing writes h->err */
      if (h->mismatch)
        mc_request_complete(h, MC_ERR_MISMATCH, "%s", why);
      else
        mc_sched_finish(h);
      return true;
    }
    if (!start_stage(h, next))
      return true;
  }
  return moved;
}
