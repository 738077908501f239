#define _GNU_SOURCE /* pthread_setname_np */
/* The progress thread: one per communicator. It owns every transport call, runs the
 * schedules, enforces deadlines, and sleeps on file descriptors when there is nothing to do. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include "internal.h"
#include "shm.h"

void mc_progress_kick(mc_comm_t *comm) {
  uint64_t one = 1;
  ssize_t n = write(comm->wake_fd, &one, sizeof one);
  (void)n; /* a full counter already means "wake up" */
}

void mc_progress_enqueue(mc_comm_t *comm, mc_request_t *req) {
  pthread_mutex_lock(&comm->lock);
  if (comm->incoming_tail)
    comm->incoming_tail->next = req;
  else
    comm->incoming_head = req;
  comm->incoming_tail = req;
  /* A sleeping progress thread is woken after the spin time rather than at once: a caller that
   * waits for the request right away (a blocking operation) runs it itself in that time
   * (mc_wait), and a second thread waking up would only compete with it. Each new request
   * pushes the timer back; an asynchronous request starts at most that late (also when this
   * host's ranks outnumber its CPUs and callers do not spin: they run their shm operations
   * themselves, mc_progress_wait). */
  if (comm->sleeping && comm->kick_timer_fd >= 0 && !comm->kick_armed) {
    comm->kick_armed = true;
    int64_t ns = comm->kick_ns;
    struct itimerspec t = {.it_value = {ns / 1000000000, ns % 1000000000 ? ns % 1000000000 : 1}};
    timerfd_settime(comm->kick_timer_fd, 0, &t, NULL);
  }
  pthread_mutex_unlock(&comm->lock);
}

static void active_append(mc_comm_t *comm, mc_request_t *req) {
  req->next = NULL;
  if (comm->active_tail)
    comm->active_tail->next = req;
  else
    comm->active_head = req;
  comm->active_tail = req;
}

void mc_progress_adopt(mc_comm_t *comm, mc_request_t *req) {
  active_append(comm, req);
  mc_sched_run(req);
}

/* Start what user threads queued. */
static bool take_incoming(mc_comm_t *comm) {
  pthread_mutex_lock(&comm->lock);
  mc_request_t *list = comm->incoming_head;
  comm->incoming_head = comm->incoming_tail = NULL;
  pthread_mutex_unlock(&comm->lock);
  bool any = list != NULL;
  while (list) {
    mc_request_t *req = list;
    list = list->next;
    active_append(comm, req);
    mc_sched_start(req);
  }
  return any;
}

static bool xfers_in_flight(const mc_request_t *req) {
  for (int i = 0; i < req->nxfers; i++)
    if (req->xfers[i].posted && !req->xfers[i].done)
      return true;
  return false;
}

/* Zombies whose transfers all completed. */
static void release_zombies_done(mc_comm_t *comm) {
  mc_request_t **link = &comm->zombies;
  while (*link) {
    mc_request_t *req = *link;
    if (xfers_in_flight(req)) {
      link = &req->next;
    } else {
      *link = req->next;
      mc_request_release(req);
    }
  }
}

static void release_zombies(mc_comm_t *comm) {
  while (comm->zombies) {
    mc_request_t *req = comm->zombies;
    comm->zombies = req->next;
    mc_request_release(req);
  }
}

/* Closing the transport is what guarantees that nothing in flight touches a buffer whose
 * operation has been reported failed: every failure that leaves transfers posted breaks the
 * communicator, and the transport closes before the failure is reported. */
static void close_transport(mc_comm_t *comm) {
  if (!comm->transport)
    return;
  comm->tops->close(comm->transport);
  comm->transport = NULL;
  for (mc_request_t *req = comm->active_head; req; req = req->next)
    for (int i = 0; i < req->nxfers; i++)
      req->xfers[i].done = true; /* gone with it */
  release_zombies(comm);
}

static bool any_in_flight(const mc_comm_t *comm) {
  for (const mc_request_t *req = comm->active_head; req; req = req->next)
    if (xfers_in_flight(req))
      return true;
  return comm->zombies != NULL;
}

/* A broken communicator stops using its transport. Closing it is what stops the provider for
 * good, but fi_close of an rxm endpoint costs 10-20 ms of CPU (more under load), and failure
 * reports would wait for it. So the transfers are settled first: posted receives are cancelled
 * (a cancelled operation completes with FI_ECANCELED; rxm does it at once for a receive not
 * yet matched) and the completion queue is read to its end. A transfer that has its
 * completion is out of the provider's hands (the completion contract). If something is still
 * in flight (a send not yet complete, a receive already being filled) the transport is closed
 * here, before any report; otherwise the progress loop reports the failures and closes the
 * idle transport after that. */
static void quiesce(mc_comm_t *comm) {
  if (!comm->transport)
    return;
  mc_request_t *lists[2] = {comm->active_head, comm->zombies};
  for (int l = 0; l < 2; l++)
    for (mc_request_t *req = lists[l]; req; req = req->next)
      for (int i = 0; i < req->nxfers; i++) {
        mc_xfer_t *x = &req->xfers[i];
        if (x->posted && !x->done && !x->is_send)
          comm->tops->cancel(comm->transport, &x->tctx);
      }
  mc_completion_t comps[32];
  int n;
  while ((n = comm->tops->poll(comm->transport, comps, 32)) > 0)
    for (int i = 0; i < n; i++)
      if (comps[i].ctx) /* the request fails anyway: no schedule runs on */
        ((mc_xfer_t *)comps[i].ctx)->done = true;
  release_zombies_done(comm);
  if (any_in_flight(comm))
    close_transport(comm);
}

void mc_comm_break(mc_comm_t *comm, mc_status_t st, const char *why) {
  pthread_mutex_lock(&comm->lock);
  bool first = comm->broken == MC_OK;
  if (first) {
    comm->broken = st;
    snprintf(comm->broken_msg, sizeof comm->broken_msg, "%s", why);
  }
  pthread_mutex_unlock(&comm->lock);
  quiesce(comm);
  if (first && comm->ctrl) /* the peers' pending operations fail now, not at their timeout */
    mc_ctrl_revoke(comm->ctrl, comm->epoch, why);
}

void mc_comm_revoke_local(mc_comm_t *comm, mc_status_t st, const char *why) {
  pthread_mutex_lock(&comm->lock);
  if (comm->broken == MC_OK) {
    comm->broken = st;
    snprintf(comm->broken_msg, sizeof comm->broken_msg, "%s", why);
  }
  if (comm->wake_fd >= 0) /* under the lock: stop may close the fd, and the number be reused */
    mc_progress_kick(comm);
  pthread_mutex_unlock(&comm->lock);
}

/* Drop finished requests from the active list. A failed one whose transfers the transport
 * still holds (only possible while the communicator is not broken) waits as a zombie. */
static void reap(mc_comm_t *comm) {
  mc_request_t **link = &comm->active_head, *prev = NULL;
  while (*link) {
    mc_request_t *req = *link;
    if (!atomic_load(&req->done)) {
      prev = req;
      link = &req->next;
      continue;
    }
    *link = req->next;
    if (comm->active_tail == req)
      comm->active_tail = prev;
    if (xfers_in_flight(req)) {
      for (int i = 0; i < req->nxfers; i++)
        if (req->xfers[i].posted && !req->xfers[i].done && !req->xfers[i].is_send)
          comm->tops->cancel(comm->transport, &req->xfers[i].tctx);
      req->next = comm->zombies;
      comm->zombies = req;
    } else {
      mc_request_release(req);
    }
  }
  release_zombies_done(comm);
}

/* Names the peers a request still waits for, e.g. "1, 3". */
static void waiting_for(const mc_request_t *req, char *out, size_t len) {
  if (req->hier.shm || req->hier.leaders) /* hierarchical: the stage it waits for */
    req = req->hier.shm ? req->hier.shm : req->hier.leaders;
  if (req->on_shm) {
    mc_shm_waiting_for(req, out, len);
    return;
  }
  size_t used = 0;
  out[0] = 0;
  for (int i = 0; i < req->nxfers && used + 12 < len; i++) {
    const mc_xfer_t *x = &req->xfers[i];
    if (x->done)
      continue;
    used += snprintf(out + used, len - used, "%s%s %d", used ? ", " : "",
                     x->is_send ? "send to" : "recv from", x->peer);
  }
  if (!used)
    snprintf(out, len, "nothing (not started)");
}

static void fail_all_active(mc_comm_t *comm, mc_status_t st, const char *why) {
  for (mc_request_t *req = comm->active_head; req; req = req->next)
    mc_request_complete(req, st, "rank %d: %s #%u on %s failed: %s", comm->rank,
                        mc_op_name(req->kind), req->seq, comm->name, why);
}

/* A missed deadline leaves the ranks out of step, so the communicator is broken. */
static int64_t check_deadlines(mc_comm_t *comm, int64_t now) {
  int64_t nearest = INT64_MAX;
  for (mc_request_t *req = comm->active_head; req; req = req->next) {
    if (atomic_load(&req->done))
      continue;
    if (now < req->deadline_ns) {
      if (req->deadline_ns < nearest)
        nearest = req->deadline_ns;
      continue;
    }
    char peers[160], why[MC_ERRLEN];
    waiting_for(req, peers, sizeof peers);
    snprintf(why, sizeof why, "an earlier %s #%u timed out after %d ms waiting for %s",
             mc_op_name(req->kind), req->seq, comm->timeout_ms, peers);
    mc_comm_break(comm, MC_ERR_TIMEOUT, why);
    mc_shm_leave(comm, MC_ERR_TIMEOUT, why); /* before the caller gets its buffers back */
    mc_request_complete(
        req, MC_ERR_TIMEOUT, "rank %d: %s #%u on %s timed out after %d ms, still waiting for %s",
        comm->rank, mc_op_name(req->kind), req->seq, comm->name, comm->timeout_ms, peers);
  }
  return nearest;
}

static bool drain_completions(mc_comm_t *comm) {
  mc_completion_t comps[32];
  bool any = false;
  int n;
  while (comm->transport && (n = comm->tops->poll(comm->transport, comps, 32)) > 0) {
    any = true;
    for (int i = 0; i < n; i++) {
      mc_xfer_t *x = (mc_xfer_t *)comps[i].ctx;
      if (x) /* an error entry without a context names no transfer */
        mc_sched_xfer_done(x, &comps[i]);
    }
  }
  return any;
}

/* Called with progress_mu held; releases it while blocked. */
static void sleep_until_work(mc_comm_t *comm, int64_t nearest_deadline) {
  int fd = -1, backstop_us = 0;
  pthread_mutex_lock(&comm->lock);
  comm->sleeping = true;
  bool work = comm->incoming_head || comm->stop;
  pthread_mutex_unlock(&comm->lock);
  bool can_sleep =
      !work && (!comm->transport || comm->tops->prepare_sleep(comm->transport, &fd, &backstop_us));
  int shm_fd = -1;
  pthread_mutex_lock(&comm->lock); /* a waiting caller may be sleeping on the FIFO: it runs the
                                      shm operations then, and hands back when it leaves */
  bool shm_asked = can_sleep && comm->shm && !comm->shm_fifo_taken;
  comm->shm_fifo_taken |= shm_asked;
  pthread_mutex_unlock(&comm->lock);
  if (shm_asked)
    can_sleep = mc_shm_prepare_sleep(comm, &shm_fd);
  if (shm_asked && can_sleep && shm_fd < 0) { /* no shm operation under way: the FIFO stays
                                                 free for the next caller that waits on one */
    pthread_mutex_lock(&comm->lock);
    comm->shm_fifo_taken = shm_asked = false;
    pthread_mutex_unlock(&comm->lock);
  }
  if (can_sleep) {
    struct pollfd fds[4] = {{comm->wake_fd, POLLIN, 0},
                            {fd, POLLIN, 0},
                            {shm_fd, POLLIN, 0},
                            {comm->kick_timer_fd, POLLIN, 0}};
    int timeout_ms = -1;
    bool pending = comm->active_head != NULL;
    if (pending && nearest_deadline != INT64_MAX) {
      int64_t left = (nearest_deadline - mc_now_ns()) / 1000000 + 1;
      timeout_ms = left < 0 ? 0 : left > 1000000 ? 1000000 : (int)left;
    }
    if (pending && backstop_us > 0) {
      int b = backstop_us / 1000 ? backstop_us / 1000 : 1;
      if (timeout_ms < 0 || b < timeout_ms)
        timeout_ms = b;
    }
    pthread_mutex_unlock(&comm->progress_mu); /* a waiting caller may progress meanwhile */
    if (poll(fds, 4, timeout_ms) > 0) {       /* fd -1: ignored */
      uint64_t v;
      ssize_t r = 0;
      if (fds[0].revents & POLLIN)
        r = read(comm->wake_fd, &v, sizeof v);
      if (fds[3].revents & POLLIN)
        r = read(comm->kick_timer_fd, &v, sizeof v);
      (void)r;
    }
    pthread_mutex_lock(&comm->progress_mu);
    if (comm->transport)
      comm->tops->after_sleep(comm->transport);
  }
  if (shm_asked)
    mc_shm_after_sleep(comm);
  pthread_mutex_lock(&comm->lock);
  comm->sleeping = comm->kick_armed = false;
  if (shm_asked)
    comm->shm_fifo_taken = false;
  pthread_mutex_unlock(&comm->lock);
}

/* One pass over the communicator's work: retry posts, start new requests, read completions,
 * advance shm operations, enforce deadlines. The caller holds progress_mu. */
static bool progress_pass(mc_comm_t *comm, int64_t *nearest, bool *stop) {
  pthread_mutex_lock(&comm->lock);
  *stop = comm->stop;
  mc_status_t broken = comm->broken;
  char why[MC_ERRLEN];
  if (broken != MC_OK)
    memcpy(why, comm->broken_msg, sizeof why);
  pthread_mutex_unlock(&comm->lock);

  /* retry older requests first: new ones must not overtake them into the queues */
  comm->p2p_stalled[0] = comm->p2p_stalled[1] = false;
  for (mc_request_t *req = comm->active_head; req; req = req->next)
    mc_sched_repost(req);
  bool busy = take_incoming(comm);
  if (broken != MC_OK) {
    mc_shm_leave(comm, broken, why);
    quiesce(comm); /* again: transfers may have been posted since the break */
    fail_all_active(comm, broken == MC_ERR_TIMEOUT ? MC_ERR_REVOKED : broken, why);
    close_transport(comm); /* after the reports: nothing in flight touches their buffers */
  }
  busy |= drain_completions(comm);
  if (broken == MC_OK && comm->shm)
    busy |= mc_shm_progress(comm);
  else if (broken == MC_OK && comm->hier)
    busy |= mc_hier_progress(comm); /* alone on this host */
  *nearest = check_deadlines(comm, mc_now_ns());
  reap(comm);
  return busy;
}

/* The thread sleeps as soon as a pass finds nothing to do: spinning here (as it did for
 * MC_SPIN_US after each operation) took a core from the callers, which run their own
 * operations (mc_wait), and from the peers they wait for; 8 B allreduce through the shim on
 * 2 ranks went from 44 to 17 us without it (docs/performance.md). */
static void *progress_main(void *arg) {
  mc_comm_t *comm = arg;
  pthread_setname_np(pthread_self(), "mc-progress");
  for (;;) {
    int64_t nearest;
    bool stop;
    pthread_mutex_lock(&comm->progress_mu);
    bool busy = progress_pass(comm, &nearest, &stop);
    if (stop) {
      comm->progress_exited = true;
      pthread_mutex_unlock(&comm->progress_mu);
      break;
    }
    if (!busy)
      sleep_until_work(comm, nearest);
    pthread_mutex_unlock(&comm->progress_mu);
  }
  return NULL;
}

/* Sleeps on the shm FIFO for the caller (progress_mu held on entry, released on return) until
 * a flag it waits for moves, its request completes (mc_request_complete writes to the FIFO
 * then), or the nearest deadline or limit. 1: it slept; 0: it did not (a flag moved meanwhile,
 * or the request is done); -1: it cannot (another thread has the FIFO, or the operation waits
 * for the transport: a hierarchical one's leaders' stage) and hands over. */
static int caller_sleep(mc_comm_t *comm, mc_request_t *req, int64_t nearest, int64_t limit) {
  pthread_mutex_lock(&comm->lock);
  bool mine = !comm->shm_fifo_taken;
  comm->shm_fifo_taken = true;
  pthread_mutex_unlock(&comm->lock);
  if (!mine) {
    pthread_mutex_unlock(&comm->progress_mu);
    return -1;
  }
  int fd = -1;
  atomic_store(&comm->caller_polling, true); /* then check done: pairs with the completer */
  bool asleep = !atomic_load(&req->done) && mc_shm_prepare_sleep(comm, &fd);
  bool can = asleep && fd >= 0;
  pthread_mutex_unlock(&comm->progress_mu);
  if (can) {
    int64_t until = nearest < limit ? nearest : limit, timeout_ms = -1;
    if (until != INT64_MAX) {
      timeout_ms = (until - mc_now_ns() + 999999) / 1000000;
      timeout_ms = timeout_ms < 0 ? 0 : timeout_ms > 1000000 ? 1000000 : timeout_ms;
    }
    struct pollfd p = {fd, POLLIN, 0};
    poll(&p, 1, (int)timeout_ms);
  }
  atomic_store(&comm->caller_polling, false);
  pthread_mutex_lock(&comm->progress_mu);
  mc_shm_after_sleep(comm);
  pthread_mutex_unlock(&comm->progress_mu);
  pthread_mutex_lock(&comm->lock);
  comm->shm_fifo_taken = false;
  pthread_mutex_unlock(&comm->lock);
  return can ? 1 : asleep ? -1 : 0;
}

/* With several ranks per core, handing each operation to the progress thread costs two thread
 * wake-ups on top of the one for the peers' flags (the kick, then the completion); the caller
 * runs it itself instead, and sleeps where the progress thread would have. */
void mc_progress_wait(mc_comm_t *comm, mc_request_t *req, int64_t limit) {
  while (!atomic_load(&req->done) && mc_now_ns() < limit) {
    if (pthread_mutex_trylock(&comm->progress_mu))
      break; /* the progress thread is in a pass: it goes on with the request */
    if (comm->progress_exited) {
      pthread_mutex_unlock(&comm->progress_mu);
      break;
    }
    int64_t nearest;
    bool stop;
    bool busy = progress_pass(comm, &nearest, &stop);
    pthread_mutex_lock(&comm->lock);
    if (comm->kick_armed && !comm->incoming_head) {
      /* the pass took the work the kick was for: no second thread needs to wake for it */
      struct itimerspec off = {{0, 0}, {0, 0}};
      timerfd_settime(comm->kick_timer_fd, 0, &off, NULL);
      comm->kick_armed = false;
    }
    pthread_mutex_unlock(&comm->lock);
    if (atomic_load(&req->done) || stop || !req->on_shm || !comm->shm) {
      pthread_mutex_unlock(&comm->progress_mu);
      break;
    }
    if (busy) {
      pthread_mutex_unlock(&comm->progress_mu);
      continue;
    }
    int slept = caller_sleep(comm, req, nearest, limit);
    if (slept < 0 && !atomic_load(&req->done))
      break; /* hand over */
    if (!slept && !atomic_load(&req->done)) {
      pthread_mutex_lock(&comm->lock); /* another thread took the FIFO meanwhile: hand over */
      bool taken = comm->shm_fifo_taken;
      pthread_mutex_unlock(&comm->lock);
      if (taken)
        break;
    }
  }
  /* leaving with the request done: whatever else is pending is the progress thread's again
   * (if it is in a pass now, it sees it anyway); not done: the caller hands over (mc_wait) */
  if (!atomic_load(&req->done))
    return;
  bool left = true; /* unless seen otherwise: a thread in a pass now may be a caller that leaves */
  if (!pthread_mutex_trylock(&comm->progress_mu)) {
    left = false;
    for (mc_request_t *r = comm->active_head; r && !left; r = r->next)
      left = !atomic_load(&r->done);
    pthread_mutex_unlock(&comm->progress_mu);
  }
  pthread_mutex_lock(&comm->lock);
  if ((left || comm->incoming_head) && comm->wake_fd >= 0)
    mc_progress_kick(comm);
  pthread_mutex_unlock(&comm->lock);
}

bool mc_progress_help(mc_comm_t *comm) {
  if (pthread_mutex_trylock(&comm->progress_mu))
    return false; /* another thread is making progress */
  bool busy = false;
  if (!comm->progress_exited) {
    int64_t nearest;
    bool stop;
    busy = progress_pass(comm, &nearest, &stop);
  }
  pthread_mutex_unlock(&comm->progress_mu);
  return busy;
}

mc_status_t mc_progress_start(mc_comm_t *comm) {
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd < 0 || timer < 0) {
    if (fd >= 0)
      close(fd);
    if (timer >= 0)
      close(timer);
    return MC_ERR_INTERNAL;
  }
  pthread_mutex_lock(&comm->lock); /* the control thread may kick it from now on */
  comm->wake_fd = fd;
  comm->kick_timer_fd = timer;
  pthread_mutex_unlock(&comm->lock);
  if (pthread_create(&comm->thread, NULL, progress_main, comm)) {
    pthread_mutex_lock(&comm->lock);
    comm->wake_fd = comm->kick_timer_fd = -1;
    pthread_mutex_unlock(&comm->lock);
    close(fd);
    close(timer);
    return MC_ERR_INTERNAL;
  }
  return MC_OK;
}

/* Fails what is pending, stops the thread. Zombie transfers die with the transport. */
void mc_progress_stop(mc_comm_t *comm) {
  pthread_mutex_lock(&comm->lock);
  comm->stop = true;
  if (comm->broken == MC_OK) {
    comm->broken = MC_ERR_REVOKED;
    snprintf(comm->broken_msg, sizeof comm->broken_msg, "the communicator was destroyed");
  }
  pthread_mutex_unlock(&comm->lock);
  mc_progress_kick(comm);
  pthread_join(comm->thread, NULL);
  pthread_mutex_lock(&comm->lock);
  int fd = comm->wake_fd, timer = comm->kick_timer_fd;
  comm->wake_fd = comm->kick_timer_fd = -1;
  pthread_mutex_unlock(&comm->lock);
  close(fd);
  close(timer);
}
