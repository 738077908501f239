#define _GNU_SOURCE
/* Communicators: rendezvous through the caller's store, transport set-up, the progress
 * thread, and the entry points that validate and queue operations. */
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "reduce.h"
#include "shm.h"

static _Thread_local char last_error[MC_ERRLEN];

const char *mc_last_error(void) { return last_error; }

static mc_status_t fail(mc_status_t st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static mc_status_t fail(mc_status_t st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  va_end(ap);
  return st;
}

const char *mc_op_name(mc_op_kind_t kind) {
  switch (kind) {
  case MC_OP_ALLREDUCE: return "allreduce";
  case MC_OP_ALLGATHER: return "allgather";
  case MC_OP_BROADCAST: return "broadcast";
  case MC_OP_BARRIER: return "barrier";
  case MC_OP_SEND: return "send";
  case MC_OP_RECV: return "recv";
  case MC_OP_CONNECT: return "connect";
  case MC_OP_REDUCE_SCATTER: return "reduce_scatter";
  case MC_OP_REDUCE: return "reduce";
  case MC_OP_GATHER: return "gather";
  case MC_OP_SCATTER: return "scatter";
  case MC_OP_ALLTOALL: return "alltoall";
  case MC_OP_ALLTOALLV: return "alltoallv";
  }
  return "op";
}

void mc_config_init(mc_config_t *cfg) { memset(cfg, 0, sizeof *cfg); }

/* Same host = same kernel boot and same network namespace; exchanged, never guessed. */
static void host_id(char *out, size_t len) {
  char boot[64] = "unknown";
  FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
  if (f) {
    if (!fgets(boot, sizeof boot, f))
      strcpy(boot, "unknown");
    fclose(f);
    boot[strcspn(boot, "\n")] = 0;
  }
  struct stat st;
  unsigned long netns = stat("/proc/self/ns/net", &st) == 0 ? (unsigned long)st.st_ino : 0;
  snprintf(out, len, "%s/%lu", boot, netns);
}

static mc_status_t store_get(mc_comm_t *comm, const mc_store_t *store, const char *key, void **val,
                             size_t *len) {
  mc_status_t st = store->get(store->ctx, key, val, len, comm->timeout_ms);
  if (st != MC_OK)
    return fail(st,
                "rank %d: creating communicator %s: store key '%s' not available within %d "
                "ms (%s): did every rank join?",
                comm->rank, comm->name, key, comm->timeout_ms, mc_status_str(st));
  return MC_OK;
}

/* An endpoint for the communicator of `epoch` in this lineage. */
static mc_status_t open_endpoint(const mc_comm_t *comm, uint32_t epoch, mc_transport_t **out,
                                 char *err, size_t errlen) {
  mc_transport_params_t tp = {.provider = *comm->want_provider ? comm->want_provider : NULL,
                              .all_local = comm->all_local,
                              .comm_id = comm->id + epoch, /* unique per epoch */
                              .rank = comm->members[comm->rank],
                              .size = comm->lineage_size};
  /* one at a time per process: libfabric 1.17's shm provider fails fi_enable with EBUSY when
   * two endpoints are enabled at once (a standby opening while a communicator is created) */
  static pthread_mutex_t opening = PTHREAD_MUTEX_INITIALIZER;
  pthread_mutex_lock(&opening);
  mc_status_t st = mc_ofi_transport.open(&tp, out, err, errlen);
  pthread_mutex_unlock(&opening);
  return st;
}

static void use_transport(mc_comm_t *comm, mc_transport_t *t) {
  comm->tops = &mc_ofi_transport;
  comm->transport = t;
  snprintf(comm->provider, sizeof comm->provider, "%s", comm->tops->provider(t));
}

static mc_status_t open_transport(mc_comm_t *comm) {
  char err[MC_ERRLEN - 64];
  mc_transport_t *t;
  mc_status_t st = open_endpoint(comm, comm->epoch, &t, err, sizeof err);
  if (st != MC_OK)
    return fail(st, "rank %d: communicator %s: %s", comm->rank, comm->name, err);
  use_transport(comm, t);
  return MC_OK;
}

/* Tag of the pre-connection messages: bit 63, which no tag of the engine sets (mc_tag). */
#define WARM_TAG (1ULL << 60)

/* Connects a standby endpoint to the other members' standbys ahead of need, so that a shrink
 * does not wait for rxm's connection set-up (tens of ms per connection on a loaded host): the
 * members swap standby addresses over the control plane, then each sends an empty message to
 * every lower rank and receives one from every higher rank (connections are opened from one
 * side only, as in connect_all). Members that fail meanwhile are skipped. Returns false if a
 * transfer is left in the endpoint (it is then unusable). */
static int warm_peer(const mc_transport_ctx_t *ctx, int n, const mc_completion_t *c) {
  ptrdiff_t r = c->ctx ? (const mc_transport_ctx_t *)c->ctx - ctx : -1;
  return r >= 0 && r < n ? (int)r : -1;
}

static bool warm_standby(mc_comm_t *comm, mc_transport_t *t) {
  const mc_transport_ops_t *ops = &mc_ofi_transport;
  const int n = comm->size, me = comm->rank;
  char addr[256];
  size_t alen = sizeof addr;
  void **addrs = calloc(n, sizeof *addrs);
  size_t *lens = calloc(n, sizeof *lens);
  mc_transport_ctx_t *ctx = calloc(n, sizeof *ctx);
  bool *pending = calloc(n, sizeof *pending), *unsent = calloc(n, sizeof *unsent);
  bool clean = true;
  /* only connection-oriented providers need it (all members run the same one) */
  bool want = t && addrs && lens && ctx && pending && unsent && strstr(ops->provider(t), "rxm") &&
              ops->get_address(t, addr, &alen) == MC_OK;
  if (!want) { /* tell the others not to wait for this rank */
    mc_ctrl_standby_exchange(comm->ctrl, comm->epoch + 1, comm->members, n, NULL, 0,
                             &comm->standby_stop, 0, NULL, NULL);
    goto out;
  }
  if (mc_ctrl_standby_exchange(comm->ctrl, comm->epoch + 1, comm->members, n, addr, alen,
                               &comm->standby_stop, comm->timeout_ms, addrs, lens) != MC_OK)
    goto out;
  for (int r = 0; r < n; r++)
    if (!addrs[r] && (addrs[r] = malloc(alen))) { /* this rank, or failed: never addressed */
      memcpy(addrs[r], addr, alen);
      lens[r] = alen;
    }
  if (ops->set_peers(t, addrs, lens, n) != MC_OK)
    goto out;
  /* pending: posted, no completion yet; unsent: a send rxm refused for now (EAGAIN while it
   * connects), posted again on the next pass */
  int left = 0;
  for (int r = 0; r < n; r++) {
    if (r == me || mc_ctrl_is_failed(comm->ctrl, comm->members[r]))
      continue;
    unsent[r] = r < me;
    pending[r] = r > me && ops->recv(t, -1, NULL, 0, WARM_TAG | (uint64_t)r, &ctx[r]) == MC_OK;
    left += unsent[r] || pending[r];
  }
  const int64_t deadline = mc_now_ns() + (int64_t)10000 * 1000000;
  while (left > 0) {
    for (int r = 0; r < n; r++)
      if (unsent[r]) {
        mc_status_t st = ops->send(t, r, NULL, 0, WARM_TAG | (uint64_t)me, 0, &ctx[r]);
        if (st != MC_ERR_TIMEOUT)
          unsent[r] = false, pending[r] = st == MC_OK, left -= st != MC_OK;
      }
    mc_completion_t comps[32];
    int got = ops->poll(t, comps, 32);
    for (int i = 0; i < got; i++) {
      int r = warm_peer(ctx, n, &comps[i]);
      if (r >= 0 && pending[r])
        pending[r] = false, left--;
    }
    if (got > 0)
      continue;
    /* a receive from a member that failed is cancelled (at once, unless already matched); a
     * send to one may stay in the endpoint: if that is all that is left, stop */
    bool stop = atomic_load(&comm->standby_stop) || mc_now_ns() > deadline, live = false;
    for (int r = 0; r < n; r++) {
      if (!pending[r] && !unsent[r])
        continue;
      bool dead = stop || mc_ctrl_is_failed(comm->ctrl, comm->members[r]);
      if (dead && unsent[r])
        unsent[r] = false, left--;
      else if (dead && r > me)
        ops->cancel(t, &ctx[r]);
      live |= !dead;
    }
    if (!live) {
      while ((got = ops->poll(t, comps, 32)) > 0)
        for (int i = 0; i < got; i++) {
          int r = warm_peer(ctx, n, &comps[i]);
          if (r >= 0 && pending[r])
            pending[r] = false, left--;
        }
      clean = left == 0;
      break;
    }
    /* rxm accepts connections in its progress, which its CQ fd does not signal: sleep on the
     * fd for at most the transport's backstop (1 ms), also when fi_trywait says events are
     * pending (rxm says so while it connects; looping at once would spin) */
    int fd = -1, backstop_us = 0;
    bool can = ops->prepare_sleep(t, &fd, &backstop_us);
    struct pollfd p = {fd, POLLIN, 0};
    poll(&p, can && fd >= 0 ? 1 : 0, backstop_us > 1000 ? backstop_us / 1000 : 1);
    if (can)
      ops->after_sleep(t);
  }
out:
  for (int r = 0; addrs && r < n; r++)
    free(addrs[r]);
  free(addrs), free(lens), free(ctx), free(pending), free(unsent);
  return clean;
}

/* Opening an endpoint takes tens of ms in libfabric 1.17 (fi_enable), too slow for a shrink:
 * each communicator opens the endpoint of its successor in the background, ahead of need, and
 * connects it to the other members' (warm_standby). */
static void *open_standby(void *arg) {
  mc_comm_t *comm = arg;
  pthread_setname_np(pthread_self(), "mc-standby");
  char err[160];
  mc_transport_t *t = NULL;
  if (open_endpoint(comm, comm->epoch + 1, &t, err, sizeof err) != MC_OK)
    t = NULL; /* shrink opens one itself */
  if (comm->size > 1 && !warm_standby(comm, t) && t) {
    mc_ofi_transport.close(t);
    t = NULL;
  }
  comm->standby = t;
  atomic_store(&comm->standby_ready, true);
  return NULL;
}

bool mc_comm_standby_ready(mc_comm_t *comm) { return atomic_load(&comm->standby_ready); }

static void start_standby(mc_comm_t *comm) {
  atomic_store(&comm->standby_stop, false);
  atomic_store(&comm->standby_ready, false);
  comm->standby_running = pthread_create(&comm->standby_thread, NULL, open_standby, comm) == 0;
}

/* The standby opens once the communicator has completed an operation, not as soon as it
 * exists: opening an endpoint costs ~15 ms of CPU, which on a loaded host competed with the
 * ranks still finishing the same creation or shrink (and with the first collective after it). */
void mc_comm_allow_standby(mc_comm_t *comm) { atomic_store(&comm->standby_started, false); }

void mc_comm_op_succeeded(mc_comm_t *comm) {
  if (atomic_load(&comm->standby_started))
    return;
  pthread_mutex_lock(&comm->lock);
  if (!atomic_load(&comm->standby_started)) {
    atomic_store(&comm->standby_started, true);
    start_standby(comm);
  }
  pthread_mutex_unlock(&comm->lock);
}

/* The standby endpoint, once its thread is done. A shrink waits for the pre-connection to
 * finish (failed members are skipped); destroy stops it. */
static mc_transport_t *take_standby(mc_comm_t *comm, bool stop) {
  pthread_mutex_lock(&comm->lock);
  bool never = !atomic_load(&comm->standby_started); /* allowed, but no operation succeeded */
  atomic_store(&comm->standby_started, true);        /* none starts from here on */
  pthread_mutex_unlock(&comm->lock);
  /* A peer whose operation succeeded where this rank's failed (its part did not need the
   * failed rank) pre-connects, and its shrink waits for this rank's standby address: say that
   * none comes. */
  if (never && comm->ctrl && comm->size > 1)
    mc_ctrl_standby_exchange(comm->ctrl, comm->epoch + 1, comm->members, comm->size, NULL, 0,
                             &comm->standby_stop, 0, NULL, NULL);
  if (comm->standby_running) {
    if (stop) {
      atomic_store(&comm->standby_stop, true);
      mc_ctrl_kick(comm->ctrl);
    }
    pthread_join(comm->standby_thread, NULL);
  }
  comm->standby_running = false;
  mc_transport_t *t = comm->standby;
  comm->standby = NULL;
  return t;
}

/* Allocates the communicator's own state; members[i] is the lineage rank of rank i. */
static mc_comm_t *comm_new(int rank, int size, int lineage_size, const char *name, int timeout_ms) {
  mc_comm_t *comm = calloc(1, sizeof *comm);
  if (!comm)
    return NULL;
  comm->members = calloc(size, sizeof *comm->members);
  comm->rank_of = malloc(lineage_size * sizeof *comm->rank_of);
  comm->host_of = calloc(size, sizeof *comm->host_of);
  comm->local = calloc(size, sizeof *comm->local);
  comm->leaders = calloc(size, sizeof *comm->leaders);
  comm->host_first = calloc(size + 1, sizeof *comm->host_first);
  comm->major_pos = calloc(size, sizeof *comm->major_pos);
  if (!comm->members || !comm->rank_of || !comm->host_of || !comm->local || !comm->leaders ||
      !comm->host_first || !comm->major_pos) {
    free(comm->members), free(comm->rank_of), free(comm->host_of), free(comm->local);
    free(comm->leaders), free(comm->host_first), free(comm->major_pos), free(comm);
    return NULL;
  }
  for (int r = 0; r < lineage_size; r++)
    comm->rank_of[r] = -1;
  comm->rank = rank;
  comm->size = size;
  comm->lineage_size = lineage_size;
  comm->timeout_ms = timeout_ms;
  comm->wake_fd = comm->kick_timer_fd = -1;
  atomic_store(&comm->standby_started, true); /* until mc_comm_allow_standby */
  snprintf(comm->name, sizeof comm->name, "%s", name);
  pthread_mutex_init(&comm->lock, NULL);
  pthread_mutex_init(&comm->progress_mu, NULL);
  return comm;
}

static void comm_free(mc_comm_t *comm) {
  mc_transport_t *standby = take_standby(comm, true);
  if (standby)
    mc_ofi_transport.close(standby);
  if (comm->transport)
    comm->tops->close(comm->transport);
  mc_shm_destroy(comm);
  if (comm->ctrl)
    mc_ctrl_detach(comm->ctrl, comm);
  pthread_mutex_destroy(&comm->lock);
  pthread_mutex_destroy(&comm->progress_mu);
  free(comm->members), free(comm->rank_of), free(comm->host_of), free(comm->local);
  free(comm->leaders), free(comm->host_first), free(comm->major_pos), free(comm->scratch);
  free(comm);
}

/* From host_of (any labels, the same for ranks of one host): hosts numbered in the order of
 * their lowest rank, host-major order, this host's ranks, the leaders. */
static void set_locality(mc_comm_t *comm) {
  int *label = comm->leaders; /* scratch: host label of each host number so far */
  comm->nhosts = comm->local_ranks = 0;
  for (int r = 0; r < comm->size; r++) {
    int h = 0;
    while (h < comm->nhosts && label[h] != comm->host_of[r])
      h++;
    if (h == comm->nhosts)
      label[comm->nhosts++] = comm->host_of[r];
    comm->host_of[r] = h;
  }
  /* host-major order: host 0's ranks, then host 1's, ... (label: each host's next position) */
  memset(comm->host_first, 0, (size_t)(comm->nhosts + 1) * sizeof *comm->host_first);
  for (int r = 0; r < comm->size; r++)
    comm->host_first[comm->host_of[r] + 1]++;
  for (int h = 0; h < comm->nhosts; h++) {
    comm->host_first[h + 1] += comm->host_first[h];
    label[h] = comm->host_first[h];
  }
  comm->host_major = true;
  for (int r = 0; r < comm->size; r++) {
    comm->major_pos[r] = label[comm->host_of[r]]++;
    comm->host_major &= comm->major_pos[r] == r;
  }
  for (int r = comm->size - 1; r >= 0; r--) /* lowest rank last: it stays */
    comm->leaders[comm->host_of[r]] = r;
  for (int r = 0; r < comm->size; r++)
    if (comm->host_of[r] == comm->host_of[comm->rank])
      comm->local[comm->local_ranks++] = r;
  comm->all_local = comm->nhosts == 1;
  /* the same on every rank, as MC_SHM must be */
  comm->hier = comm->nhosts > 1 && comm->nhosts < comm->size && mc_param_int(MC_PARAM_SHM);
  cpu_set_t cpus;
  int ncpu = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  comm->kick_ns = mc_param_int(MC_PARAM_SPIN_US) * 1000;
  comm->spin_ns = comm->local_ranks <= ncpu ? comm->kick_ns : 0;
}

/* The intra-host path, when this host has several of the ranks and MC_SHM allows it. */
static mc_status_t open_shm(mc_comm_t *comm) {
  if (comm->local_ranks < 2 || !mc_param_int(MC_PARAM_SHM))
    return MC_OK;
  char err[MC_ERRLEN - 96];
  mc_status_t st = mc_shm_create(comm, err, sizeof err);
  if (st != MC_OK)
    return fail(st, "rank %d: communicator %s: shared memory: %s (MC_SHM=0 turns it off)",
                comm->rank, comm->name, err);
  return MC_OK;
}

static mc_status_t rendezvous(mc_comm_t *comm, const mc_config_t *cfg, const mc_store_t *store) {
  char key[64];
  void *val = NULL;
  size_t len = 0;
  mc_status_t st;
  if (comm->rank == 0) {
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, 0) != sizeof id)
      id = (uint64_t)getpid() * 2654435761u;
    if ((st = store->set(store->ctx, "mc/id", &id, sizeof id)) != MC_OK)
      return fail(st, "rank 0: creating communicator %s: store set failed", comm->name);
  }
  if ((st = store_get(comm, store, "mc/id", &val, &len)) != MC_OK)
    return st;
  if (len == sizeof comm->id)
    memcpy(&comm->id, val, len);
  free(val);

  /* "<host id>\n<MC_HIER_SEGMENT_BYTES>": hierarchical allreduces cut alike on every rank */
  char host[128], mine[160];
  host_id(host, sizeof host);
  long long seg = (long long)mc_param_int(MC_PARAM_HIER_SEGMENT_BYTES), other_seg = seg;
  int seg_differs = -1;
  snprintf(mine, sizeof mine, "%s\n%lld", host, seg);
  snprintf(key, sizeof key, "mc/host/%d", comm->rank);
  if ((st = store->set(store->ctx, key, mine, strlen(mine) + 1)) != MC_OK)
    return fail(st, "rank %d: creating communicator %s: store set failed", comm->rank, comm->name);
  char(*hosts)[sizeof host] = calloc(comm->size, sizeof host);
  int *first = calloc(comm->size, sizeof *first), nfirst = 0; /* each host's lowest rank */
  if (!hosts || !first) {
    free(hosts), free(first);
    return fail(MC_ERR_NOMEM, "rank %d: creating communicator %s: out of memory", comm->rank,
                comm->name);
  }
  for (int r = 0; r < comm->size; r++) {
    snprintf(key, sizeof key, "mc/host/%d", r);
    if ((st = store_get(comm, store, key, &val, &len)) != MC_OK) {
      free(hosts), free(first);
      return st;
    }
    char theirs[sizeof mine];
    snprintf(theirs, sizeof theirs, "%.*s", (int)strnlen(val, len), (const char *)val);
    free(val);
    char *nl = strchr(theirs, '\n');
    long long their_seg = nl ? strtoll(nl + 1, NULL, 10) : 0;
    if (nl)
      *nl = 0;
    if (their_seg != seg && seg_differs < 0)
      seg_differs = r, other_seg = their_seg;
    snprintf(hosts[r], sizeof host, "%.127s", theirs);
    comm->host_of[r] = r; /* labelled by the lowest rank with the same host */
    for (int h = 0; h < nfirst && comm->host_of[r] == r; h++)
      if (!strcmp(hosts[first[h]], hosts[r]))
        comm->host_of[r] = first[h];
    if (comm->host_of[r] == r)
      first[nfirst++] = r;
  }
  free(first);
  free(hosts);
  set_locality(comm);
  if (comm->hier && seg_differs >= 0)
    return fail(MC_ERR_INVALID,
                "rank %d: creating communicator %s: rank %d has MC_HIER_SEGMENT_BYTES=%lld, this "
                "rank %lld: it must be the same on every rank",
                comm->rank, comm->name, seg_differs, other_seg, seg);
  bool all_local = comm->all_local;

  const char *want = cfg->transport ? cfg->transport : mc_param_str(MC_PARAM_TRANSPORT);
  snprintf(comm->want_provider, sizeof comm->want_provider, "%s", strcmp(want, "auto") ? want : "");

  /* the control plane listens before its address is published, so dialling it never fails */
  char ctrl_addr[64], err[MC_ERRLEN - 64];
  if ((st = mc_ctrl_create(comm->rank, comm->size, comm->id, all_local, &comm->ctrl, ctrl_addr,
                           sizeof ctrl_addr, err, sizeof err)) != MC_OK)
    return fail(st, "rank %d: creating communicator %s: %s", comm->rank, comm->name, err);
  snprintf(key, sizeof key, "mc/ctrl/%d", comm->rank);
  if ((st = store->set(store->ctx, key, ctrl_addr, strlen(ctrl_addr) + 1)) != MC_OK)
    return fail(st, "rank %d: creating communicator %s: store set failed", comm->rank, comm->name);

  if ((st = open_transport(comm)) != MC_OK)
    return st;
  if ((st = open_shm(comm)) != MC_OK) /* before the address: who reads it can attach */
    return st;
  char addr[256];
  size_t alen = sizeof addr;
  if ((st = comm->tops->get_address(comm->transport, addr, &alen)) != MC_OK)
    return fail(st, "rank %d: transport address unavailable", comm->rank);
  snprintf(key, sizeof key, "mc/addr/%d", comm->rank);
  if ((st = store->set(store->ctx, key, addr, alen)) != MC_OK)
    return fail(st, "rank %d: creating communicator %s: store set failed", comm->rank, comm->name);
  void **addrs = calloc(comm->size, sizeof *addrs);
  size_t *lens = calloc(comm->size, sizeof *lens);
  st = addrs && lens ? MC_OK : MC_ERR_NOMEM;
  for (int r = 0; r < comm->size && st == MC_OK; r++) {
    snprintf(key, sizeof key, "mc/addr/%d", r);
    st = store_get(comm, store, key, &addrs[r], &lens[r]);
  }
  if (st == MC_OK && (st = comm->tops->set_peers(comm->transport, addrs, lens, comm->size)))
    fail(st, "rank %d: creating communicator %s: could not add peer addresses", comm->rank,
         comm->name);
  for (int r = 0; addrs && r < comm->size; r++) {
    free(addrs[r]);
    addrs[r] = NULL;
  }
  /* control plane mesh: the last use of the store */
  for (int r = 0; r < comm->size && st == MC_OK; r++) {
    snprintf(key, sizeof key, "mc/ctrl/%d", r);
    st = store_get(comm, store, key, &addrs[r], &lens[r]);
  }
  if (st == MC_OK && (st = mc_ctrl_connect(comm->ctrl, (char *const *)addrs, comm->timeout_ms, err,
                                           sizeof err)) != MC_OK)
    fail(st, "rank %d: creating communicator %s: %s", comm->rank, comm->name, err);
  for (int r = 0; addrs && r < comm->size; r++)
    free(addrs[r]);
  free(addrs);
  free(lens);
  return st;
}

static void release_list(mc_request_t *req);
static mc_status_t submit(mc_comm_t *comm, mc_request_t *r, mc_request_t **out);

/* Connections are made eagerly and only from the higher rank to the lower one: tcp;ofi_rxm
 * 1.17 can leave both sends pending forever when two ranks connect to each other at once. */
static mc_status_t connect_all(mc_comm_t *comm) {
  mc_request_t *req = mc_request_new(comm, MC_OP_CONNECT);
  if (!req)
    return fail(MC_ERR_NOMEM, "rank %d: out of memory", comm->rank);
  req->dtype = MC_UINT8;
  submit(comm, req, &req);
  mc_status_t st = mc_wait(req, comm->timeout_ms);
  if (st != MC_OK)
    fail(st, "rank %d: creating communicator %s: connecting to the other ranks failed: %s",
         comm->rank, comm->name, st == MC_ERR_TIMEOUT ? "timed out" : mc_request_error(req));
  mc_request_free(req);
  if (st != MC_OK || !comm->shm)
    return st;
  /* Every rank maps the others' segments at its first shm operation, and removes its own
   * segment's name once all have: an internal barrier of this host's ranks does both now, so
   * that no name outlives a crash. It does not count as a user operation. */
  mc_request_t *barrier = mc_request_new(comm, MC_OP_BARRIER);
  if (!barrier)
    return fail(MC_ERR_NOMEM, "rank %d: out of memory", comm->rank);
  barrier->dtype = MC_UINT8;
  barrier->algo = MC_ALGO_SHM;
  submit(comm, barrier, &barrier);
  pthread_mutex_lock(&comm->lock);
  comm->coll_seq--;
  pthread_mutex_unlock(&comm->lock);
  st = mc_wait(barrier, comm->timeout_ms);
  mc_shm_unlink(comm); /* done by the barrier if it succeeded; if not, the comm is broken */
  if (st != MC_OK)
    fail(st, "rank %d: creating communicator %s: attaching shared memory failed: %s", comm->rank,
         comm->name, st == MC_ERR_TIMEOUT ? "timed out" : mc_request_error(barrier));
  mc_request_free(barrier);
  return st;
}

mc_status_t mc_comm_create(const mc_config_t *cfg, const mc_store_t *store, int rank, int size,
                           mc_comm_t **out) {
  mc_config_t defaults;
  if (!cfg)
    mc_config_init(&defaults), cfg = &defaults;
  if (!out || !store || !store->set || !store->get)
    return fail(MC_ERR_INVALID, "mc_comm_create: missing store or output pointer");
  if (size < 1 || size > MC_MAX_RANKS || rank < 0 || rank >= size)
    return fail(MC_ERR_INVALID, "mc_comm_create: rank %d / size %d out of range (size 1..%d)", rank,
                size, MC_MAX_RANKS);
  if (mc_algo_config_error())
    return fail(MC_ERR_INVALID, "rank %d: mc_comm_create: %s", rank, mc_algo_config_error());
  mc_comm_t *comm =
      comm_new(rank, size, size, cfg->name && *cfg->name ? cfg->name : "comm",
               cfg->timeout_ms > 0 ? cfg->timeout_ms : (int)mc_param_int(MC_PARAM_TIMEOUT_MS));
  if (!comm)
    return fail(MC_ERR_NOMEM, "mc_comm_create: out of memory");
  for (int r = 0; r < size; r++)
    comm->members[r] = comm->rank_of[r] = r;
  mc_status_t st = rendezvous(comm, cfg, store);
  if (st == MC_OK)
    mc_ctrl_attach(comm->ctrl, comm);
  if (st == MC_OK && (st = mc_progress_start(comm)) != MC_OK)
    fail(st, "rank %d: could not start the progress thread", rank);
  else if (st == MC_OK && (st = connect_all(comm)) != MC_OK)
    mc_progress_stop(comm); /* closes the transport */
  if (st != MC_OK) {
    comm_free(comm);
    return st;
  }
  mc_comm_allow_standby(comm); /* after connect_all's internal barrier */
  MC_LOG(MC_LOG_INFO, rank,
         "communicator %s: %d ranks over %s on %d host(s), %d on this one%s, id %016llx",
         comm->name, size, comm->provider, comm->nhosts, comm->local_ranks,
         comm->shm ? " (shared memory)" : "", (unsigned long long)comm->id);
  *out = comm;
  return MC_OK;
}

int mc_comm_rank(const mc_comm_t *comm) { return comm->rank; }
int mc_comm_size(const mc_comm_t *comm) { return comm->size; }
const char *mc_comm_transport(const mc_comm_t *comm) { return comm->provider; }

mc_status_t mc_comm_set_timeout(mc_comm_t *comm, int timeout_ms) {
  if (!comm || timeout_ms <= 0)
    return MC_ERR_INVALID;
  comm->timeout_ms = timeout_ms; /* read when the next operation starts */
  return MC_OK;
}

mc_status_t mc_comm_abort(mc_comm_t *comm) {
  if (!comm)
    return MC_ERR_INVALID;
  pthread_mutex_lock(&comm->lock);
  if (comm->broken == MC_OK) {
    comm->broken = MC_ERR_REVOKED;
    snprintf(comm->broken_msg, sizeof comm->broken_msg, "the communicator was aborted");
  }
  pthread_mutex_unlock(&comm->lock);
  mc_progress_kick(comm);
  return MC_OK;
}

static void release_list(mc_request_t *req) {
  while (req) {
    mc_request_t *next = req->next;
    mc_request_release(req);
    req = next;
  }
}

mc_status_t mc_comm_destroy(mc_comm_t *comm) {
  if (!comm)
    return MC_ERR_INVALID;
  mc_progress_stop(comm);
  while (atomic_load(&comm->waiters)) /* callers spinning in mc_wait: their requests are done */
    sched_yield();
  release_list(comm->zombies);
  release_list(comm->active_head);
  comm_free(comm); /* the transport normally closed as the progress thread stopped */
  return MC_OK;
}

/* ---- fault tolerance ---- */

mc_status_t mc_comm_revoke(mc_comm_t *comm) {
  if (!comm)
    return MC_ERR_INVALID;
  char why[96];
  snprintf(why, sizeof why, "rank %d revoked the communicator", comm->rank);
  mc_comm_revoke_local(comm, MC_ERR_REVOKED, why);
  mc_ctrl_revoke(comm->ctrl, comm->epoch, why);
  return MC_OK;
}

int mc_comm_failed_ranks(mc_comm_t *comm, int *ranks, int max) {
  int n = 0;
  for (int r = 0; comm && r < comm->size; r++)
    if (r != comm->rank && mc_ctrl_is_failed(comm->ctrl, comm->members[r])) {
      if (n < max && ranks)
        ranks[n] = r;
      n++;
    }
  return n;
}

int mc_comm_origin_rank(const mc_comm_t *comm, int rank) {
  return comm && rank >= 0 && rank < comm->size ? comm->members[rank] : -1;
}

mc_status_t mc_comm_shrink(mc_comm_t *comm, const int *exclude, int n, mc_comm_t **out) {
  if (!comm || !out || n < 0 || (n && !exclude))
    return fail(MC_ERR_INVALID, "mc_comm_shrink: null communicator, output or exclude list");
  for (int i = 0; i < n; i++)
    if (exclude[i] < 0 || exclude[i] >= comm->size || exclude[i] == comm->rank)
      return fail(MC_ERR_INVALID, "rank %d: shrink of %s: cannot exclude rank %d (size %d%s)",
                  comm->rank, comm->name, exclude[i], comm->size,
                  exclude[i] == comm->rank ? ", this rank" : "");
  char why[MC_ERRLEN - 64];
  snprintf(why, sizeof why, "excluded by shrink on rank %d", comm->rank);
  for (int i = 0; i < n; i++)
    mc_ctrl_exclude(comm->ctrl, comm->members[exclude[i]], why);

  int64_t t0 = mc_now_ns();
  uint64_t *failed = calloc(mc_ctrl_words(comm->ctrl), sizeof *failed);
  if (!failed)
    return fail(MC_ERR_NOMEM, "rank %d: shrink: out of memory", comm->rank);
  mc_status_t st = mc_ctrl_agree(comm->ctrl, comm->epoch, comm->members, comm->size,
                                 comm->timeout_ms, failed, why, sizeof why);
  if (st != MC_OK) {
    free(failed);
    return fail(st, "rank %d: shrink of %s: %s", comm->rank, comm->name, why);
  }
  int64_t t_agreed = mc_now_ns();
  int size = 0, rank = -1;
  for (int r = 0; r < comm->size; r++) {
    int l = comm->members[r];
    if (failed[l / 64] >> (l % 64) & 1)
      continue;
    if (r == comm->rank)
      rank = size;
    size++;
  }
  if (rank < 0) {
    free(failed);
    return fail(MC_ERR_REVOKED, "rank %d: shrink of %s: the others declared this rank failed",
                comm->rank, comm->name);
  }
  mc_comm_t *nc = comm_new(rank, size, comm->lineage_size, comm->name, comm->timeout_ms);
  if (!nc) {
    free(failed);
    return fail(MC_ERR_NOMEM, "rank %d: shrink: out of memory", comm->rank);
  }
  for (int r = 0, i = 0; r < comm->size; r++) {
    int l = comm->members[r];
    if (!(failed[l / 64] >> (l % 64) & 1)) {
      nc->members[i] = l;
      nc->rank_of[l] = i++;
    }
  }
  free(failed);
  nc->id = comm->id;
  nc->epoch = comm->epoch + 1;
  for (int r = 0, i = 0; r < comm->size; r++)
    if (nc->rank_of[comm->members[r]] >= 0)
      nc->host_of[i++] = comm->host_of[r];
  set_locality(nc);
  memcpy(nc->want_provider, comm->want_provider, sizeof nc->want_provider);
  nc->ctrl = comm->ctrl;
  mc_ctrl_attach(nc->ctrl, nc); /* from here a member's failure revokes it */

  /* the new transport's addresses travel over the control plane, not the store */
  char addr[256];
  size_t alen = sizeof addr;
  void **addrs = calloc(size, sizeof *addrs);
  size_t *lens = calloc(size, sizeof *lens);
  mc_transport_t *standby = take_standby(comm, false);
  if (standby)
    use_transport(nc, standby);
  st = !addrs || !lens ? MC_ERR_NOMEM : standby ? MC_OK : open_transport(nc);
  if (st == MC_OK)
    st = open_shm(nc);
  if (st == MC_OK && (st = nc->tops->get_address(nc->transport, addr, &alen)) != MC_OK)
    fail(st, "rank %d: shrink: transport address unavailable", comm->rank);
  if (st == MC_OK && (st = mc_ctrl_exchange(nc->ctrl, nc->epoch, nc->members, size, addr, alen,
                                            nc->timeout_ms, addrs, lens, why, sizeof why)) != MC_OK)
    fail(st, "rank %d: shrink of %s: %s", comm->rank, comm->name, why);
  if (st == MC_OK) {
    /* a member that failed before sending its address gets this rank's own as a placeholder:
     * the new communicator is revoked already and will never address it */
    for (int r = 0; r < size; r++)
      if (!addrs[r] && (addrs[r] = malloc(alen))) {
        memcpy(addrs[r], addr, alen);
        lens[r] = alen;
      }
    if ((st = nc->tops->set_peers(nc->transport, addrs, lens, size)) != MC_OK)
      fail(st, "rank %d: shrink: could not add peer addresses", comm->rank);
  }
  for (int r = 0; addrs && r < size; r++)
    free(addrs[r]);
  free(addrs);
  free(lens);
  if (st == MC_OK && (st = mc_progress_start(nc)) != MC_OK)
    fail(st, "rank %d: shrink: could not start the progress thread", comm->rank);
  if (st != MC_OK) {
    mc_ctrl_withdraw(nc->ctrl, nc->epoch, nc->members, size); /* nobody waits for this rank */
    comm_free(nc);
    return st;
  }
  /* A member failing now leaves the new communicator revoked, not the shrink failed: the
   * caller sees it at its next operation and shrinks again. */
  int64_t t_exchanged = mc_now_ns();
  connect_all(nc);
  mc_comm_allow_standby(nc);
  MC_LOG(MC_LOG_INFO, nc->rank,
         "communicator %s: shrunk from %d to %d ranks in %.1f ms (agreement %.1f, standby and "
         "addresses "
         "%.1f, connections %.1f), epoch %u",
         nc->name, comm->size, size, (mc_now_ns() - t0) / 1e6, (t_agreed - t0) / 1e6,
         (t_exchanged - t_agreed) / 1e6, (mc_now_ns() - t_exchanged) / 1e6, nc->epoch);
  *out = nc;
  return MC_OK;
}

/* ---- operation entry points ---- */

static mc_status_t check_common(mc_comm_t *comm, mc_request_t **req, mc_dtype_t dtype,
                                const char *op) {
  if (!comm || !req)
    return fail(MC_ERR_INVALID, "%s: null communicator or request pointer", op);
  if ((unsigned)dtype >= MC_DTYPE_COUNT)
    return fail(MC_ERR_INVALID, "rank %d: %s: unknown dtype %d", comm->rank, op, (int)dtype);
  return MC_OK;
}

static mc_status_t check_buffer(mc_comm_t *comm, const void *buf, size_t count, const char *op) {
  if (count && !buf)
    return fail(MC_ERR_INVALID, "rank %d: %s: null buffer", comm->rank, op);
  if (count > ((size_t)1 << 35)) /* the signature carries 35 bits of count */
    return fail(MC_ERR_INVALID, "rank %d: %s: count %zu too large", comm->rank, op, count);
  return MC_OK;
}

static mc_status_t check_redop(mc_comm_t *comm, mc_dtype_t dtype, mc_redop_t op, const char *what) {
  if ((unsigned)op >= MC_REDOP_COUNT)
    return fail(MC_ERR_INVALID, "rank %d: %s: unknown reduce op %d", comm->rank, what, (int)op);
  if (op == MC_PREMUL_SUM)
    return fail(MC_ERR_INVALID, "rank %d: %s: premul_sum needs a factor: use mc_%s_premul",
                comm->rank, what, what);
  if (mc_reduce_supported(dtype, op) != MC_OK)
    return fail(MC_ERR_UNSUPPORTED, "rank %d: %s: %s is not supported for %s", comm->rank, what,
                mc_redop_name(op), mc_dtype_name(dtype));
  return MC_OK;
}

/* Queues a request, or completes it at once if the communicator is already broken. */
static mc_status_t submit(mc_comm_t *comm, mc_request_t *r, mc_request_t **out) {
  pthread_mutex_lock(&comm->lock);
  mc_status_t broken = comm->broken;
  char why[MC_ERRLEN];
  memcpy(why, comm->broken_msg, sizeof why);
  if (r->kind != MC_OP_SEND && r->kind != MC_OP_RECV)
    r->seq = comm->coll_seq++;
  pthread_mutex_unlock(&comm->lock);
  r->deadline_ns = mc_now_ns() + (int64_t)comm->timeout_ms * 1000000;
  *out = r;
  if (broken != MC_OK) {
    mc_request_complete(r, MC_ERR_REVOKED, "rank %d: %s on %s refused: %s", comm->rank,
                        mc_op_name(r->kind), comm->name, why);
    mc_request_release(r); /* the engine's reference */
    return MC_OK;
  }
  mc_progress_enqueue(comm, r);
  return MC_OK;
}

static mc_request_t *new_request(mc_comm_t *comm, mc_op_kind_t kind) {
  mc_request_t *r = mc_request_new(comm, kind);
  if (!r)
    fail(MC_ERR_NOMEM, "rank %d: %s: out of memory", comm->rank, mc_op_name(kind));
  return r;
}

static mc_status_t check_root(mc_comm_t *comm, int root, const char *op) {
  if (root < 0 || root >= comm->size)
    return fail(MC_ERR_INVALID, "rank %d: %s: root %d out of range (size %d)", comm->rank, op, root,
                comm->size);
  return MC_OK;
}

/* Rejects a and b overlapping: the algorithms read one while they write the other. */
static mc_status_t check_apart(mc_comm_t *comm, const void *a, size_t a_bytes, const void *b,
                               size_t b_bytes, const char *op) {
  if (a_bytes && b_bytes && (const char *)a < (const char *)b + b_bytes &&
      (const char *)b < (const char *)a + a_bytes)
    return fail(MC_ERR_INVALID, "rank %d: %s: out overlaps in (not supported in place)", comm->rank,
                op);
  return MC_OK;
}

/* Validates a reducing call with `op`, or with premul_sum when premul is set. */
static mc_status_t check_reduction(mc_comm_t *comm, mc_dtype_t dtype, mc_redop_t op, bool premul,
                                   const char *what) {
  if (!premul)
    return check_redop(comm, dtype, op, what);
  if (mc_reduce_supported(dtype, MC_PREMUL_SUM) != MC_OK)
    return fail(MC_ERR_UNSUPPORTED, "rank %d: %s: premul_sum is not supported for %s", comm->rank,
                what, mc_dtype_name(dtype));
  return MC_OK;
}

static mc_status_t allreduce(mc_comm_t *comm, const void *in, void *out, size_t count,
                             mc_dtype_t dtype, mc_redop_t op, bool premul, double factor,
                             mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "allreduce");
  if (st == MC_OK)
    st = check_buffer(comm, in, count, "allreduce");
  if (st == MC_OK)
    st = check_buffer(comm, out, count, "allreduce");
  if (st == MC_OK)
    st = check_reduction(comm, dtype, op, premul, "allreduce");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_ALLREDUCE);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = out, r->count = count, r->dtype = dtype;
  r->redop = premul ? MC_PREMUL_SUM : op, r->factor = factor;
  return submit(comm, r, req);
}

mc_status_t mc_allreduce(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                         mc_redop_t op, mc_request_t **req) {
  return allreduce(comm, in, out, count, dtype, op, false, 1.0, req);
}

mc_status_t mc_allreduce_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                                mc_dtype_t dtype, double factor, mc_request_t **req) {
  return allreduce(comm, in, out, count, dtype, MC_SUM, true, factor, req);
}

static mc_status_t reduce_scatter(mc_comm_t *comm, const void *in, void *out, size_t count,
                                  mc_dtype_t dtype, mc_redop_t op, bool premul, double factor,
                                  mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "reduce_scatter");
  if (st == MC_OK)
    st = check_buffer(comm, out, count, "reduce_scatter");
  if (st == MC_OK) /* in holds size * count; check_buffer bounds count first */
    st = check_buffer(comm, in, count ? count * (size_t)comm->size : 0, "reduce_scatter");
  if (st == MC_OK)
    st = check_reduction(comm, dtype, op, premul, "reduce_scatter");
  size_t esz = mc_dtype_size(dtype);
  if (st == MC_OK)
    st =
        check_apart(comm, in, count * (size_t)comm->size * esz, out, count * esz, "reduce_scatter");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_REDUCE_SCATTER);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = out, r->count = count, r->dtype = dtype;
  r->redop = premul ? MC_PREMUL_SUM : op, r->factor = factor;
  return submit(comm, r, req);
}

mc_status_t mc_reduce_scatter(mc_comm_t *comm, const void *in, void *out, size_t count,
                              mc_dtype_t dtype, mc_redop_t op, mc_request_t **req) {
  return reduce_scatter(comm, in, out, count, dtype, op, false, 1.0, req);
}

mc_status_t mc_reduce_scatter_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                                     mc_dtype_t dtype, double factor, mc_request_t **req) {
  return reduce_scatter(comm, in, out, count, dtype, MC_SUM, true, factor, req);
}

static mc_status_t reduce(mc_comm_t *comm, const void *in, void *out, size_t count,
                          mc_dtype_t dtype, mc_redop_t op, bool premul, double factor, int root,
                          mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "reduce");
  if (st == MC_OK)
    st = check_buffer(comm, in, count, "reduce");
  if (st == MC_OK)
    st = check_root(comm, root, "reduce");
  if (st == MC_OK && comm->rank == root)
    st = check_buffer(comm, out, count, "reduce");
  if (st == MC_OK)
    st = check_reduction(comm, dtype, op, premul, "reduce");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_REDUCE);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = comm->rank == root ? out : NULL, r->count = count, r->dtype = dtype;
  r->redop = premul ? MC_PREMUL_SUM : op, r->factor = factor, r->root = root;
  return submit(comm, r, req);
}

mc_status_t mc_reduce(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                      mc_redop_t op, int root, mc_request_t **req) {
  return reduce(comm, in, out, count, dtype, op, false, 1.0, root, req);
}

mc_status_t mc_reduce_premul(mc_comm_t *comm, const void *in, void *out, size_t count,
                             mc_dtype_t dtype, double factor, int root, mc_request_t **req) {
  return reduce(comm, in, out, count, dtype, MC_SUM, true, factor, root, req);
}

/* gather and scatter: the size * count buffer (gather's out, scatter's in) is the root's. */
static mc_status_t rooted(mc_comm_t *comm, mc_op_kind_t kind, const void *in, void *out,
                          size_t count, mc_dtype_t dtype, int root, mc_request_t **req) {
  const char *op = mc_op_name(kind);
  const bool gather = kind == MC_OP_GATHER;
  mc_status_t st = check_common(comm, req, dtype, op);
  if (st == MC_OK)
    st = check_root(comm, root, op);
  if (st == MC_OK)
    st = check_buffer(comm, gather ? in : out, count, op);
  if (st == MC_OK && comm->rank == root)
    st = check_buffer(comm, gather ? out : in, count ? count * (size_t)comm->size : 0, op);
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, kind);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = out, r->count = count, r->dtype = dtype, r->root = root;
  if (comm->rank != root && gather)
    r->out = NULL;
  if (comm->rank != root && !gather)
    r->in = NULL;
  return submit(comm, r, req);
}

mc_status_t mc_gather(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                      int root, mc_request_t **req) {
  return rooted(comm, MC_OP_GATHER, in, out, count, dtype, root, req);
}

mc_status_t mc_scatter(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                       int root, mc_request_t **req) {
  return rooted(comm, MC_OP_SCATTER, in, out, count, dtype, root, req);
}

mc_status_t mc_alltoall(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                        mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "alltoall");
  size_t total = count ? count * (size_t)comm->size : 0;
  if (st == MC_OK)
    st = check_buffer(comm, in, total, "alltoall");
  if (st == MC_OK)
    st = check_buffer(comm, out, total, "alltoall");
  if (st == MC_OK)
    st = check_apart(comm, in, total * mc_dtype_size(dtype), out, total * mc_dtype_size(dtype),
                     "alltoall");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_ALLTOALL);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = out, r->count = count, r->dtype = dtype;
  return submit(comm, r, req);
}

/* Elements spanned by (counts, displs): the end of the furthest non-empty block. */
static size_t extent(const size_t *counts, const size_t *displs, int n) {
  size_t end = 0;
  for (int i = 0; i < n; i++)
    if (counts[i] && displs[i] + counts[i] > end)
      end = displs[i] + counts[i];
  return end;
}

mc_status_t mc_alltoallv(mc_comm_t *comm, const void *in, const size_t *send_counts,
                         const size_t *send_displs, void *out, const size_t *recv_counts,
                         const size_t *recv_displs, mc_dtype_t dtype, mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "alltoallv");
  if (st != MC_OK)
    return st;
  const int n = comm->size;
  if (!send_counts || !send_displs || !recv_counts || !recv_displs)
    return fail(MC_ERR_INVALID, "rank %d: alltoallv: null count or displacement array", comm->rank);
  const size_t limit = (size_t)1 << 40; /* keeps displ + count from wrapping */
  for (int i = 0; i < n && st == MC_OK; i++) {
    st = check_buffer(comm, in, send_counts[i], "alltoallv");
    if (st == MC_OK)
      st = check_buffer(comm, out, recv_counts[i], "alltoallv");
    if (st == MC_OK && (send_displs[i] > limit || recv_displs[i] > limit))
      st = fail(MC_ERR_INVALID, "rank %d: alltoallv: displacement for rank %d too large",
                comm->rank, i);
  }
  size_t esz = mc_dtype_size(dtype);
  if (st == MC_OK)
    st = check_apart(comm, in, extent(send_counts, send_displs, n) * esz, out,
                     extent(recv_counts, recv_displs, n) * esz, "alltoallv");
  if (st != MC_OK)
    return st;
  size_t *copy = malloc(4 * (size_t)n * sizeof *copy);
  if (!copy)
    return fail(MC_ERR_NOMEM, "rank %d: alltoallv: out of memory", comm->rank);
  const size_t *arrays[4] = {send_counts, send_displs, recv_counts, recv_displs};
  for (int a = 0; a < 4; a++)
    memcpy(copy + (size_t)a * n, arrays[a], n * sizeof *copy);
  mc_request_t *r = new_request(comm, MC_OP_ALLTOALLV);
  if (!r) {
    free(copy);
    return MC_ERR_NOMEM;
  }
  r->in = in, r->out = out, r->dtype = dtype, r->vcounts = copy;
  return submit(comm, r, req);
}

mc_status_t mc_allgather(mc_comm_t *comm, const void *in, void *out, size_t count, mc_dtype_t dtype,
                         mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "allgather");
  if (st == MC_OK)
    st = check_buffer(comm, in, count, "allgather");
  if (st == MC_OK)
    st = check_buffer(comm, out, count, "allgather");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_ALLGATHER);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = in, r->out = out, r->count = count, r->dtype = dtype;
  return submit(comm, r, req);
}

mc_status_t mc_broadcast(mc_comm_t *comm, void *buf, size_t count, mc_dtype_t dtype, int root,
                         mc_request_t **req) {
  mc_status_t st = check_common(comm, req, dtype, "broadcast");
  if (st == MC_OK)
    st = check_buffer(comm, buf, count, "broadcast");
  if (st != MC_OK)
    return st;
  if ((st = check_root(comm, root, "broadcast")) != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_BROADCAST);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = buf, r->out = buf, r->count = count, r->dtype = dtype, r->root = root;
  return submit(comm, r, req);
}

mc_status_t mc_barrier(mc_comm_t *comm, mc_request_t **req) {
  mc_status_t st = check_common(comm, req, MC_UINT8, "barrier");
  if (st != MC_OK)
    return st;
  mc_request_t *r = new_request(comm, MC_OP_BARRIER);
  if (!r)
    return MC_ERR_NOMEM;
  r->dtype = MC_UINT8;
  return submit(comm, r, req);
}

static mc_status_t p2p(mc_comm_t *comm, mc_op_kind_t kind, const void *buf, size_t count,
                       mc_dtype_t dtype, int peer, int tag, mc_request_t **req) {
  const char *op = mc_op_name(kind);
  mc_status_t st = check_common(comm, req, dtype, op);
  if (st == MC_OK)
    st = check_buffer(comm, buf, count, op);
  if (st != MC_OK)
    return st;
  bool any_ok = kind == MC_OP_RECV && peer == MC_ANY_SOURCE;
  if (!any_ok && (peer < 0 || peer >= comm->size))
    return fail(MC_ERR_INVALID, "rank %d: %s: peer %d out of range (size %d)", comm->rank, op, peer,
                comm->size);
  if (tag < 0 || tag > MC_TAG_MAX)
    return fail(MC_ERR_INVALID, "rank %d: %s: tag %d out of range 0..%d", comm->rank, op, tag,
                MC_TAG_MAX);
  mc_request_t *r = new_request(comm, kind);
  if (!r)
    return MC_ERR_NOMEM;
  r->in = buf, r->out = (void *)buf, r->count = count, r->dtype = dtype, r->peer = peer;
  r->seq = (uint32_t)tag;
  return submit(comm, r, req);
}

mc_status_t mc_send(mc_comm_t *comm, const void *buf, size_t count, mc_dtype_t dtype, int peer,
                    int tag, mc_request_t **req) {
  return p2p(comm, MC_OP_SEND, buf, count, dtype, peer, tag, req);
}

mc_status_t mc_recv(mc_comm_t *comm, void *buf, size_t count, mc_dtype_t dtype, int peer, int tag,
                    mc_request_t **req) {
  return p2p(comm, MC_OP_RECV, buf, count, dtype, peer, tag, req);
}
