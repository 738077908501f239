/* Request lifecycle: creation, completion (exactly once), waiting, callbacks, release. */
#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"
#include "shm.h"

int64_t mc_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

mc_request_t *mc_request_new(mc_comm_t *comm, mc_op_kind_t kind) {
  mc_request_t *req = calloc(1, sizeof *req);
  if (!req)
    return NULL;
  pthread_mutex_init(&req->lock, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&req->cond, &attr);
  pthread_condattr_destroy(&attr);
  req->refs = 2; /* the caller's and the engine's */
  req->comm = comm;
  req->kind = kind;
  req->source = -1;
  req->grp_me = comm->rank;
  req->grp_n = comm->size;
  return req;
}

void mc_request_release(mc_request_t *req) {
  pthread_mutex_lock(&req->lock);
  int left = --req->refs;
  pthread_mutex_unlock(&req->lock);
  if (left)
    return;
  if (req->hier.shm)
    mc_request_release(req->hier.shm);
  if (req->hier.leaders)
    mc_request_release(req->hier.leaders);
  free(req->tmp);
  free(req->vcounts);
  pthread_mutex_destroy(&req->lock);
  pthread_cond_destroy(&req->cond);
  free(req);
}

void mc_request_complete(mc_request_t *req, mc_status_t st, const char *fmt, ...) {
  pthread_mutex_lock(&req->lock);
  if (atomic_load(&req->done)) {
    pthread_mutex_unlock(&req->lock);
    return;
  }
  req->status = st;
  if (st != MC_OK && fmt) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(req->err, sizeof req->err, fmt, ap);
    va_end(ap);
    MC_LOG(MC_LOG_INFO, req->comm ? req->comm->rank : -1, "%s", req->err);
  }
  atomic_store(&req->done, true);
  mc_comm_t *comm = req->comm;
  if (comm && atomic_load(&comm->caller_polling)) /* pairs with mc_progress_wait */
    mc_shm_wake_self(comm);
  mc_callback_t cb = req->callback;
  void *arg = req->callback_arg;
  pthread_cond_broadcast(&req->cond);
  pthread_mutex_unlock(&req->lock);
  if (cb)
    cb(req, arg);
}

mc_status_t mc_request_on_complete(mc_request_t *req, mc_callback_t fn, void *arg) {
  if (!req || !fn)
    return MC_ERR_INVALID;
  pthread_mutex_lock(&req->lock);
  bool run_now = atomic_load(&req->done);
  if (!run_now) {
    req->callback = fn;
    req->callback_arg = arg;
  }
  pthread_mutex_unlock(&req->lock);
  if (run_now)
    fn(req, arg);
  return MC_OK;
}

mc_status_t mc_wait(mc_request_t *req, int timeout_ms) {
  if (!req)
    return MC_ERR_INVALID;
  if (atomic_load(&req->done))
    return req->status;
  /* Spin briefly before blocking, making progress in this thread: two thread wake-ups (to the
   * progress thread and back) cost more than a short operation. The progress thread stays
   * asleep while a caller spins; if the operation outlasts the spin it is woken to take over.
   * The comm is alive while the request is pending (destroy completes every request under its
   * lock first), and waits for `waiters` to drop before it frees the comm. */
  const int64_t start = mc_now_ns();
  const int64_t limit = timeout_ms >= 0 ? start + timeout_ms * 1000000LL : INT64_MAX;
  mc_comm_t *comm = NULL;
  pthread_mutex_lock(&req->lock);
  if (!atomic_load(&req->done) && (comm = req->comm))
    atomic_fetch_add(&comm->waiters, 1);
  pthread_mutex_unlock(&req->lock);
  if (comm) {
    int64_t now = start, spin_ns = comm->spin_ns;
    int64_t until = now + spin_ns < limit ? now + spin_ns : limit;
    while (!atomic_load(&req->done) && (now = mc_now_ns()) < until) {
      if (mc_progress_help(comm)) /* moving: keep going */
        until = now + spin_ns < limit ? now + spin_ns : limit;
      else
        sched_yield();
    }
    /* then it sleeps where the progress thread would (shm requests); what it cannot run
     * itself, the progress thread takes over (and sees new deadlines) */
    if (!atomic_load(&req->done) && now < limit)
      mc_progress_wait(comm, req, limit);
    if (!atomic_load(&req->done)) {
      pthread_mutex_lock(&comm->lock);
      if (comm->wake_fd >= 0)
        mc_progress_kick(comm);
      pthread_mutex_unlock(&comm->lock);
    }
    atomic_fetch_sub(&comm->waiters, 1);
  }
  if (atomic_load(&req->done))
    return req->status;
  /* the rest of the time given, counted from the call (the condition variable runs on the
   * monotonic clock, as mc_now_ns) */
  struct timespec until = {(time_t)(limit / 1000000000LL), (long)(limit % 1000000000LL)};
  mc_status_t st = MC_OK;
  pthread_mutex_lock(&req->lock);
  while (!atomic_load(&req->done)) {
    if (timeout_ms < 0) {
      pthread_cond_wait(&req->cond, &req->lock); /* the operation's deadline bounds this */
    } else if (pthread_cond_timedwait(&req->cond, &req->lock, &until) == ETIMEDOUT &&
               !atomic_load(&req->done)) {
      st = MC_ERR_TIMEOUT;
      break;
    }
  }
  if (st == MC_OK)
    st = req->status;
  pthread_mutex_unlock(&req->lock);
  return st;
}

mc_status_t mc_test(mc_request_t *req, int *done) {
  if (!req || !done)
    return MC_ERR_INVALID;
  *done = atomic_load(&req->done);
  return *done ? req->status : MC_OK;
}

const char *mc_request_error(const mc_request_t *req) {
  if (!req || !atomic_load(&((mc_request_t *)req)->done))
    return "";
  return req->status == MC_OK ? "" : req->err;
}

int mc_request_source(const mc_request_t *req) { return req ? req->source : -1; }

void mc_request_free(mc_request_t *req) {
  if (req)
    mc_request_release(req);
}

const char *mc_status_str(mc_status_t s) {
  switch (s) {
  case MC_OK: return "success";
  case MC_ERR_INVALID: return "invalid argument";
  case MC_ERR_NOMEM: return "out of memory";
  case MC_ERR_TIMEOUT: return "timed out";
  case MC_ERR_PEER_FAILED: return "peer failed";
  case MC_ERR_REVOKED: return "communicator revoked";
  case MC_ERR_MISMATCH: return "ranks disagree on the operation";
  case MC_ERR_TRANSPORT: return "transport error";
  case MC_ERR_UNSUPPORTED: return "unsupported";
  case MC_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}
