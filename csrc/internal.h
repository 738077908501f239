/* Engine internals shared by csrc/ and backend/. Not installed. */
#ifndef MOONCAKE_INTERNAL_H
#define MOONCAKE_INTERNAL_H

#include "mooncake/mooncake.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "ctrl.h"
#include "log.h"
#include "param.h"
#include "transport.h"

#define MC_MAX_RANKS 65535
#define MC_MAX_XFERS 40 /* transfers in one step: a binomial broadcast root sends to log2(n) */
/* Error texts nest (a transport error inside a step failure inside a revoke inside a refusal):
 * each level adds a prefix of at most ~150 bytes to a cause of at most 256, so 1 KiB keeps the
 * whole chain. */
#define MC_ERRLEN 1024

typedef enum {
  MC_OP_ALLREDUCE = 1,
  MC_OP_ALLGATHER,
  MC_OP_BROADCAST,
  MC_OP_BARRIER,
  MC_OP_SEND,
  MC_OP_RECV,
  MC_OP_CONNECT, /* wire-up at creation: each rank greets every lower rank */
  MC_OP_REDUCE_SCATTER,
  MC_OP_REDUCE,
  MC_OP_GATHER,
  MC_OP_SCATTER,
  MC_OP_ALLTOALL,
  MC_OP_ALLTOALLV, /* 13; the signature has 4 bits for the kind */
} mc_op_kind_t;

const char *mc_op_name(mc_op_kind_t kind);

/* The algorithm an operation runs (coll/select.c chooses, MC_ALGO overrides). */
typedef enum {
  MC_ALGO_DEFAULT = 0, /* the kind's only transport algorithm */
  MC_ALGO_TRIVIAL,     /* one rank */
  MC_ALGO_RD,          /* recursive doubling */
  MC_ALGO_RING,
  MC_ALGO_BINOMIAL,
  MC_ALGO_DISSEMINATION,
  MC_ALGO_PAIRWISE,
  MC_ALGO_SHM, /* shared memory, the shm path picks the variant by size */
  MC_ALGO_SHM_FLAT,
  MC_ALGO_SHM_TWO_PHASE,
  MC_ALGO_SHM_SLOTS, /* through the segment's slots (two copies), at any size */
  MC_ALGO_SHM_CMA,   /* single copy from the peers' buffers (process_vm_readv), where it works */
  MC_ALGO_HIER,      /* across hosts: shm on each host, the transport between hosts (coll/hier.c) */
} mc_algo_t;

/* One posted send or receive of a step. */
typedef struct mc_xfer {
  mc_transport_ctx_t tctx; /* transport-private; first so the transport can cast */
  struct mc_request *req;
  void *buf;
  size_t len;
  int peer;
  int wire_step; /* step number in the tag: the same on both ends of a message */
  bool is_send;
  bool posted;
  bool done;
} mc_xfer_t;

/* A request is one operation: its arguments, its algorithm state and its result. The user and
 * the engine each hold a reference; the last one frees it. */
struct mc_request {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int refs;
  atomic_bool done;
  mc_status_t status;
  char err[MC_ERRLEN];
  int source;
  mc_callback_t callback;
  void *callback_arg;

  /* Everything below is owned by the progress thread once the request is queued. */
  mc_comm_t *comm;
  struct mc_request *next;
  mc_op_kind_t kind;
  uint32_t seq; /* collective sequence number, or p2p tag */
  const void *in;
  void *out;
  size_t count;
  mc_dtype_t dtype;
  mc_redop_t redop;
  int root;
  int peer;
  double factor;   /* PREMUL_SUM */
  size_t *vcounts; /* alltoallv: send counts, send displs, recv counts, recv displs (size each) */
  uint64_t signature; /* what every rank must agree on; travels as remote CQ data */
  int64_t deadline_ns;

  mc_algo_t algo;
  /* The ranks a schedule runs over: grp_n of them, this one grp_me, and the communicator rank of
   * each in grp_ranks (NULL: the whole communicator, grp_me = comm->rank). A hierarchical
   * operation runs its middle stage over the hosts' leaders. */
  int grp_me, grp_n;
  const int *grp_ranks;
  /* hierarchical (coll/hier.c): stages are requests of their own; the host's shm stages run one
   * at a time in a fixed order, the leaders' stage of one segment beside them */
  struct {
    struct mc_request *shm, *leaders; /* the stages running now */
    size_t segs, seg_elems;           /* pipeline segments, elements each */
    size_t shm_started;        /* shm stages started (reduce 0, reduce 1, broadcast 0, ...) */
    size_t reduced, exchanged; /* segments through the host's reduce / the leaders */
    char *scratch;             /* the communicator's, for an allgather or reduce_scatter leader */
  } hier;
  int step_base; /* added to the step number on the wire (a hierarchical segment's parity) */
  bool on_shm;   /* run by the shared-memory path (backend/shm), not by steps */
  struct {
    bool started;
    bool cma; /* single copy from the peers' buffers instead of the slots */
    int algo, phase;
    uint64_t t0;          /* first chunk number */
    size_t chunk, chunks; /* current chunk, chunk count */
  } shm;
  int step;
  mc_xfer_t xfers[MC_MAX_XFERS];
  int nxfers;
  int npending;
  /* local reduction run when the step's transfers are done: red_dst op= red_src, after
   * copying red_base into red_dst when red_base is set */
  const void *red_base;
  void *red_dst;
  const void *red_src;
  size_t red_count;
  void *tmp;
  bool mismatch; /* ranks disagree; finish the schedule so peers are not stranded, then fail */
  bool failed;   /* completed with an error while transfers may still be in flight */
};

struct mc_comm {
  int rank;
  int size;
  char name[64];
  uint64_t id;
  uint32_t epoch; /* 0 at creation, +1 per shrink; its low 8 bits travel in every tag */
  int timeout_ms;
  mc_ctrl_t *ctrl; /* shared by the communicators of a lineage (ctrl.h) */
  int *members;    /* lineage rank of each rank */
  int *rank_of;    /* rank of each lineage rank, -1 if not a member */
  int lineage_size;
  bool all_local;
  int local_ranks; /* ranks on this host */
  /* Hosts (same kernel boot and network namespace), numbered in the order of their lowest rank:
   * the host of each rank, this host's ranks in ascending order, and each host's leader (its
   * lowest rank). */
  int nhosts;
  int *host_of;
  int *local;   /* local_ranks entries */
  int *leaders; /* nhosts entries */
  /* host-major order (host 0's ranks in rank order, then host 1's, ...): the position of each
   * host's first rank (nhosts + 1 entries) and of each rank; host_major: it is rank order */
  int *host_first;
  int *major_pos;
  bool host_major;
  bool hier; /* several hosts, one with several ranks: collectives can run hierarchically */
  /* a hierarchical allgather or reduce_scatter leader's scratch space (coll/hier.c), kept */
  char *scratch;
  size_t scratch_bytes;
  /* MC_SPIN_US, or 0 when this host's ranks outnumber the CPUs this process may use: spinning
   * then only takes the CPU away from the rank being waited for */
  int64_t spin_ns;
  char want_provider[32];  /* "" = auto */
  mc_transport_t *standby; /* the endpoint a shrink will use, opened in the background */
  pthread_t standby_thread;
  bool standby_running;
  /* set (under lock) once the standby thread may no longer start: it starts at the first
   * successful operation after creation or shrink (mc_comm_op_succeeded) */
  atomic_bool standby_started;
  atomic_bool standby_stop;  /* the standby thread stops connecting it (destroy) */
  atomic_bool standby_ready; /* the standby thread is done (tests and benchmarks wait for it) */
  const mc_transport_ops_t *tops;
  mc_transport_t *transport;
  char provider[32];
  struct mc_shm *shm; /* the intra-host path, when every rank is on this host (shm.h) */

  pthread_t thread;
  /* Held by whichever thread runs a progress pass: the progress thread, or a caller of mc_wait
   * spinning on its request (mc_progress_help). */
  pthread_mutex_t progress_mu;
  bool progress_exited; /* under progress_mu */
  atomic_int waiters;   /* callers inside mc_progress_help's spin; destroy waits for 0 */
  pthread_mutex_t lock; /* guards incoming, stop, broken, sleeping */
  mc_request_t *incoming_head, *incoming_tail;
  int wake_fd;       /* eventfd: abort, stop, a caller handing over */
  int kick_timer_fd; /* timerfd: new work (mc_progress_enqueue) */
  bool sleeping;
  int64_t kick_ns;     /* how late new work wakes a sleeping progress thread (MC_SPIN_US) */
  bool kick_armed;     /* kick_timer_fd set since the progress thread went to sleep */
  bool shm_fifo_taken; /* the progress thread or a waiting caller polls the shm FIFO: one only */
  _Atomic bool caller_polling; /* a caller sleeps on the shm FIFO: completions write to it */
  bool stop;
  mc_status_t broken; /* MC_OK while usable */
  char broken_msg[MC_ERRLEN];
  uint32_t coll_seq; /* next collective sequence number (user threads, under lock) */

  /* progress thread only */
  mc_request_t *active_head, *active_tail;
  mc_request_t *zombies; /* failed requests whose transfers are still in the transport */
  /* [is_send]: a p2p transfer got EAGAIN this pass; later p2p transfers of that direction
   * wait behind it so that posting order (= matching order) follows submission order */
  bool p2p_stalled[2];
};

/* tag layout: | 0:4 | epoch:8 | comm:8 | source rank:16 | p2p:1 | payload:27 |
 * p2p tags leave the source at 0 so a receive from any source still matches exactly; p2p
 * messages carry the sender's rank as remote CQ data instead of the collective signature. */
#define MC_TAG_SRC_SHIFT 28
#define MC_TAG_P2P (1ULL << 27)
#define MC_STEP_BITS 11
uint64_t mc_tag(const mc_comm_t *comm, int src, bool p2p, uint32_t payload);

/* Set in a signature by a rank that found the ranks' arguments differ, so that the others learn
 * it (coll/schedule.c has the signature's layout). */
#define MC_SIG_MISMATCH (1ULL << 13)

/* requests (request.c) */
mc_request_t *mc_request_new(mc_comm_t *comm, mc_op_kind_t kind);
void mc_request_complete(mc_request_t *req, mc_status_t st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void mc_request_release(mc_request_t *req);
int64_t mc_now_ns(void);
bool mc_comm_standby_ready(mc_comm_t *comm);
void mc_comm_op_succeeded(mc_comm_t *comm);
void mc_comm_allow_standby(mc_comm_t *comm);

/* progress (progress.c) */
mc_status_t mc_progress_start(mc_comm_t *comm);
void mc_progress_enqueue(mc_comm_t *comm, mc_request_t *req);
void mc_progress_stop(mc_comm_t *comm);
/* Progress thread (a pass): starts a request the engine made itself (a hierarchical stage). */
void mc_progress_adopt(mc_comm_t *comm, mc_request_t *req);
void mc_progress_kick(mc_comm_t *comm);
/* A waiting caller runs one progress pass if no other thread is; true if anything moved. */
bool mc_progress_help(mc_comm_t *comm);
/* A caller waits for its shared-memory request itself, sleeping on the shm FIFO (progress.c),
 * until it is done or limit_ns. Returns early if it cannot (not an shm request, or another
 * thread holds the progress or the FIFO): the caller then hands over to the progress thread. */
void mc_progress_wait(mc_comm_t *comm, mc_request_t *req, int64_t limit_ns);
/* Progress thread: marks the communicator broken (first cause wins) and closes its transport,
 * so no transfer outlives the failure about to be reported. */
void mc_comm_break(mc_comm_t *comm, mc_status_t st, const char *why);

/* Any thread: marks the communicator broken (first cause wins) and wakes its progress thread,
 * which fails what is pending. Does not tell the peers (the caller does, if it should). */
void mc_comm_revoke_local(mc_comm_t *comm, mc_status_t st, const char *why);

/* schedules (coll/) */
mc_algo_t mc_algo_choose(const mc_request_t *req);
bool mc_algo_is_shm(mc_algo_t a);
const char *mc_algo_config_error(void); /* MC_ALGO does not parse: why */
/* Copies `in` into `dst` (count elements), scaled by the PREMUL_SUM factor if that is the op. */
void mc_load_input(const mc_request_t *req, void *dst, const void *in, size_t count);
void mc_describe_signature(uint64_t sig, char *out, size_t len);
void mc_sched_start(mc_request_t *req); /* first step, or completion */
/* Runs a request whose signature and algorithm are set: first step, or completion. */
void mc_sched_run(mc_request_t *req);
void mc_sched_xfer_done(mc_xfer_t *x, const mc_completion_t *c);
void mc_sched_repost(mc_request_t *req); /* retry posts that got EAGAIN */
/* Completes a request whose schedule ran to its end: success, or the mismatch it recorded. */
void mc_sched_finish(mc_request_t *req);
bool mc_algo_next_step(mc_request_t *req); /* fill the next step; false when finished */
void mc_algo_setup(mc_request_t *req);     /* choose algorithm and scratch space */
/* peer: a rank of the request's group (grp_ranks) */
void mc_step_add(mc_request_t *req, bool is_send, int peer, void *buf, size_t len);

/* hierarchical operations (coll/hier.c) */
/* Advances the stages of a hierarchical request; true if it moved. On a host with several ranks
 * the shm path calls it for the request at its head; a rank alone on its host has no shm path
 * and calls mc_hier_progress, which advances its oldest hierarchical request. */
bool mc_hier_advance(mc_request_t *req);
bool mc_hier_progress(mc_comm_t *comm);

#endif
