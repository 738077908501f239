/* The control plane (ctrl.h): a TCP mesh between the processes of a lineage, a thread that
 * watches it, and the agreement that shrink runs over it. */
#define _GNU_SOURCE /* accept4 */
#include "ctrl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"
#include "internal.h"

enum {
  MSG_HELLO = 1, /* secret, rank, size: first frame from the connecting (higher) rank */
  MSG_HEARTBEAT,
  MSG_BYE,      /* the sender destroyed its last communicator of the lineage */
  MSG_FAILED,   /* rank, reason: the sender believes that rank failed */
  MSG_EXCLUDED, /* reason: the sender declared the receiver failed */
  MSG_REVOKE,   /* reason: the communicator of this epoch is revoked */
  MSG_PREPARE,  /* ballot */
  MSG_PROMISE,  /* ballot, accepted ballot, accepted value, sender's failed set */
  MSG_NACK,     /* promised ballot, sender's failed set */
  MSG_ACCEPT,   /* ballot, value */
  MSG_ACCEPTED, /* ballot */
  MSG_COMMIT,   /* value */
  MSG_ADDR,     /* transport address for the communicator of this epoch */
  MSG_STANDBY,  /* standby endpoint address for this epoch, to connect ahead of need (or none) */
};

typedef struct {
  uint32_t len; /* payload bytes after the header */
  uint8_t type;
  uint8_t pad[3];
  uint32_t epoch;
} frame_hdr_t;

#define MAX_PAYLOAD (1u << 20)

typedef struct conn {
  int fd;
  bool tx_broken; /* a write failed or was partial: the stream is no longer framed */
  int peer;       /* -1 until its HELLO arrived */
  char *buf;
  size_t used, cap;
  struct conn *next_pending;
} conn_t;

typedef struct {
  conn_t *conn;
  bool failed;
  bool left;   /* said goodbye; becomes failed after the failure timeout */
  bool silent; /* declared failed by this rank's own heartbeat timeout */
  int64_t left_deadline;
  int64_t last_rx, last_tx;
  char why[160];
} peer_t;

/* Agreement and address exchange for the communicator of one epoch. */
typedef struct epoch_state {
  struct epoch_state *next;
  uint32_t epoch;
  uint32_t promised, acc_ballot;
  uint64_t *acc_value;
  bool committed;
  uint64_t *value;
  bool joined; /* this rank's user is in the agreement */
  uint64_t *members;
  /* leading a round */
  bool leading;
  int phase; /* 1: prepare, 2: accept */
  uint32_t ballot;
  uint64_t *replied;
  uint32_t best_ballot;
  uint64_t *best_value;
  void **addr;
  size_t *addr_len;
  void **standby; /* MSG_STANDBY: a copy, length standby_len (0: the member has none) */
  size_t *standby_len;
} epoch_state_t;

typedef struct attached {
  struct attached *next;
  mc_comm_t *comm;
} attached_t;

struct mc_ctrl {
  int rank, size, words;
  uint64_t secret;
  int heartbeat_ms, failure_timeout_ms;
  int listen_fd, epoll_fd, wake_fd;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond; /* mesh complete, failures, agreement and exchange progress */
  bool stop;
  bool ready; /* mesh complete: heartbeat deadlines apply */
  int connected;
  bool excluded; /* the others declared this rank failed */
  char excluded_why[200];
  peer_t *peers;
  conn_t *pending; /* accepted, HELLO not yet read */
  attached_t *comms;
  epoch_state_t *epochs;
};

/* ---- bitmaps ---- */

static bool bit(const uint64_t *b, int i) { return b[i / 64] >> (i % 64) & 1; }
static void set_bit(uint64_t *b, int i) { b[i / 64] |= 1ULL << (i % 64); }
int mc_ctrl_words(const mc_ctrl_t *c) { return c->words; }

/* ---- sending ---- */

static void mark_failed(mc_ctrl_t *c, int r, const char *why, bool tell_others);

static void send_frame(mc_ctrl_t *c, int peer, int type, uint32_t epoch, const void *a, size_t alen,
                       const void *b, size_t blen) {
  peer_t *p = &c->peers[peer];
  if (!p->conn || p->failed || p->conn->tx_broken)
    return;
  frame_hdr_t h = {.len = (uint32_t)(alen + blen), .type = (uint8_t)type, .epoch = epoch};
  struct iovec iov[3] = {{&h, sizeof h}, {(void *)a, alen}, {(void *)b, blen}};
  struct msghdr m = {.msg_iov = iov, .msg_iovlen = 3};
  ssize_t n = sendmsg(p->conn->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n != (ssize_t)(sizeof h + alen + blen)) {
    /* Nothing more goes out on this connection (the stream is no longer framed). The peer is
     * not declared failed here: a closed connection shows up on the read side right after,
     * after any goodbye it sent, and a peer that stopped reading falls silent as well. */
    p->conn->tx_broken = true;
    return;
  }
  p->last_tx = mc_now_ns();
}

static void send_all(mc_ctrl_t *c, int type, uint32_t epoch, const void *a, size_t alen,
                     const void *b, size_t blen) {
  for (int r = 0; r < c->size; r++)
    if (r != c->rank)
      send_frame(c, r, type, epoch, a, alen, b, blen);
}

static void conn_close(mc_ctrl_t *c, conn_t *conn) {
  epoll_ctl(c->epoll_fd, EPOLL_CTL_DEL, conn->fd, NULL);
  close(conn->fd);
  free(conn->buf);
  free(conn);
}

/* ---- failures ---- */

static void agree_progress(mc_ctrl_t *c, epoch_state_t *e);

static void revoke_comms(mc_ctrl_t *c, int failed_rank, mc_status_t st, const char *why) {
#ifdef MC_PLANTED_BUG_NO_REVOKE /* proof that the fault harness catches a broken engine */
  return;
#endif
  for (attached_t *a = c->comms; a; a = a->next) {
    mc_comm_t *comm = a->comm;
    if (failed_rank >= 0 && comm->rank_of[failed_rank] < 0)
      continue;
    char msg[MC_ERRLEN];
    if (failed_rank >= 0)
      snprintf(msg, sizeof msg, "rank %d failed: %s", comm->rank_of[failed_rank], why);
    else
      snprintf(msg, sizeof msg, "%s", why);
    mc_comm_revoke_local(comm, st, msg);
  }
}

/* A failed rank is out for good: cut it off (telling it why) and tell the others. */
static void mark_failed(mc_ctrl_t *c, int r, const char *why, bool tell_others) {
  peer_t *p = &c->peers[r];
  if (r == c->rank || p->failed)
    return;
  snprintf(p->why, sizeof p->why, "%s", why);
  MC_LOG(p->left ? MC_LOG_INFO : MC_LOG_WARN, c->rank, "control: rank %d failed: %s", r, why);
  if (p->conn) {
    if (!p->left)
      send_frame(c, r, MSG_EXCLUDED, 0, why, strlen(why) + 1, NULL, 0);
    conn_close(c, p->conn);
    p->conn = NULL;
  }
  p->failed = true;
  /* An excluded rank stays quiet: the others close their connections to it as they exclude
   * it, and its report of those closes would reach a rank that has not excluded it yet as a
   * failure of a healthy rank (seen in a shrink that excluded a live rank) */
  if (tell_others && !c->excluded) {
    uint32_t who = (uint32_t)r;
    send_all(c, MSG_FAILED, 0, &who, sizeof who, why, strlen(why) + 1);
  }
  revoke_comms(c, r, MC_ERR_PEER_FAILED, why);
  for (epoch_state_t *e = c->epochs; e; e = e->next)
    agree_progress(c, e);
  pthread_cond_broadcast(&c->cond);
}

static void merge_failed(mc_ctrl_t *c, const uint64_t *failed, int from) {
  char why[64];
  snprintf(why, sizeof why, "reported by original rank %d", from);
  for (int r = 0; r < c->size; r++)
    if (bit(failed, r)) {
      if (r == c->rank)
        continue; /* it will tell us itself (EXCLUDED) */
      mark_failed(c, r, why, true);
    }
}

static void fill_failed(const mc_ctrl_t *c, uint64_t *out) {
  memset(out, 0, c->words * sizeof *out);
  for (int r = 0; r < c->size; r++)
    if (c->peers[r].failed)
      set_bit(out, r);
}

/* ---- agreement (a Paxos round led by the lowest member believed alive) ---- */

static epoch_state_t *epoch_get(mc_ctrl_t *c, uint32_t epoch) {
  for (epoch_state_t *e = c->epochs; e; e = e->next)
    if (e->epoch == epoch)
      return e;
  epoch_state_t *e = calloc(1, sizeof *e);
  size_t bytes = c->words * sizeof(uint64_t);
  if (!e)
    return NULL;
  e->epoch = epoch;
  e->acc_value = calloc(1, bytes);
  e->value = calloc(1, bytes);
  e->members = calloc(1, bytes);
  e->replied = calloc(1, bytes);
  e->best_value = calloc(1, bytes);
  e->addr = calloc(c->size, sizeof *e->addr);
  e->addr_len = calloc(c->size, sizeof *e->addr_len);
  e->standby = calloc(c->size, sizeof *e->standby);
  e->standby_len = calloc(c->size, sizeof *e->standby_len);
  if (!e->acc_value || !e->value || !e->members || !e->replied || !e->best_value || !e->addr ||
      !e->addr_len || !e->standby || !e->standby_len) {
    free(e->acc_value), free(e->value), free(e->members), free(e->replied), free(e->best_value);
    free(e->addr), free(e->addr_len), free(e->standby), free(e->standby_len), free(e);
    return NULL;
  }
  e->next = c->epochs;
  c->epochs = e;
  return e;
}

static void epoch_free(mc_ctrl_t *c, epoch_state_t *e) {
  for (int r = 0; r < c->size; r++)
    free(e->addr[r]), free(e->standby[r]);
  free(e->acc_value), free(e->value), free(e->members), free(e->replied), free(e->best_value);
  free(e->addr), free(e->addr_len), free(e->standby), free(e->standby_len), free(e);
}

/* Forget epochs older than any this rank can still be asked about. */
static void epochs_prune(mc_ctrl_t *c, uint32_t current) {
  epoch_state_t **link = &c->epochs;
  while (*link) {
    epoch_state_t *e = *link;
    if (e->epoch + 2 < current) {
      *link = e->next;
      epoch_free(c, e);
    } else {
      link = &e->next;
    }
  }
}

static int coordinator(const mc_ctrl_t *c, const epoch_state_t *e) {
  for (int r = 0; r < c->size; r++)
    if (bit(e->members, r) && !c->peers[r].failed)
      return r;
  return -1;
}

static bool all_replied(const mc_ctrl_t *c, const epoch_state_t *e) {
  for (int r = 0; r < c->size; r++)
    if (bit(e->members, r) && !c->peers[r].failed && !bit(e->replied, r))
      return false;
  return true;
}

static void commit(mc_ctrl_t *c, epoch_state_t *e, const uint64_t *value) {
  memcpy(e->value, value, c->words * sizeof *value);
  e->committed = true;
  e->leading = false;
  pthread_cond_broadcast(&c->cond);
}

static void send_members(mc_ctrl_t *c, const epoch_state_t *e, int type, const void *a, size_t alen,
                         const void *b, size_t blen) {
  for (int r = 0; r < c->size; r++)
    if (r != c->rank && bit(e->members, r))
      send_frame(c, r, type, e->epoch, a, alen, b, blen);
}

static void start_round(mc_ctrl_t *c, epoch_state_t *e) {
  mc_fault_point(c->rank, "agree", e->epoch, "prepare");
  uint32_t top = e->promised > e->ballot ? e->promised : e->ballot;
  e->ballot = ((top >> 16) + 1) << 16 | (uint32_t)c->rank;
  e->promised = e->ballot;
  e->leading = true;
  e->phase = 1;
  memset(e->replied, 0, c->words * sizeof(uint64_t));
  set_bit(e->replied, c->rank);
  e->best_ballot = e->acc_ballot;
  memcpy(e->best_value, e->acc_value, c->words * sizeof(uint64_t));
  send_members(c, e, MSG_PREPARE, &e->ballot, sizeof e->ballot, NULL, 0);
}

/* Moves this rank's part of the agreement as far as it can go now. */
static void agree_progress(mc_ctrl_t *c, epoch_state_t *e) {
  if (!e->joined || e->committed || c->excluded)
    return;
  if (coordinator(c, e) != c->rank) {
    e->leading = false;
    return;
  }
  if (!e->leading)
    start_round(c, e);
  /* the loop re-checks after each phase: members may all have replied already */
  while (e->leading && all_replied(c, e)) {
    if (e->phase == 1) {
      uint64_t *value = e->best_value;
      if (!e->best_ballot) { /* nothing accepted anywhere: decide what is known now */
        fill_failed(c, value);
        for (int w = 0; w < c->words; w++)
          value[w] &= e->members[w];
      }
      mc_fault_point(c->rank, "agree", e->epoch, "accept");
      memcpy(e->acc_value, value, c->words * sizeof *value);
      e->acc_ballot = e->ballot;
      e->phase = 2;
      memset(e->replied, 0, c->words * sizeof(uint64_t));
      set_bit(e->replied, c->rank);
      send_members(c, e, MSG_ACCEPT, &e->ballot, sizeof e->ballot, e->acc_value,
                   c->words * sizeof(uint64_t));
    } else {
      mc_fault_point(c->rank, "agree", e->epoch, "commit");
      size_t bm = c->words * sizeof(uint64_t);
      bool first = true; /* fault point "commit-partial": after the first member got it */
      for (int r = 0; r < c->size; r++)
        if (r != c->rank && bit(e->members, r)) {
          send_frame(c, r, MSG_COMMIT, e->epoch, e->acc_value, bm, NULL, 0);
          if (first)
            mc_fault_point(c->rank, "agree", e->epoch, "commit-partial");
          first = false;
        }
      commit(c, e, e->acc_value);
    }
  }
}

static void on_agreement(mc_ctrl_t *c, int from, int type, epoch_state_t *e, const char *payload,
                         size_t len) {
  size_t bm = c->words * sizeof(uint64_t);
  uint32_t ballot = 0;
  if (type != MSG_COMMIT) {
    if (len < sizeof ballot)
      return;
    memcpy(&ballot, payload, sizeof ballot);
  }
  uint64_t *failed = calloc(c->words, sizeof *failed); /* scratch for incoming bitmaps */
  if (!failed)
    return;
  switch (type) {
  case MSG_PREPARE:
  case MSG_ACCEPT:
    if (e->committed) {
      send_frame(c, from, MSG_COMMIT, e->epoch, e->value, bm, NULL, 0);
    } else if (type == MSG_PREPARE && ballot > e->promised) {
      e->promised = ballot;
      mc_fault_point(c->rank, "agree", e->epoch, "promise");
      /* ballot, accepted ballot, accepted value, failed set */
      char *body = malloc(2 * sizeof ballot + 2 * bm);
      if (body) {
        memcpy(body, &ballot, sizeof ballot);
        memcpy(body + sizeof ballot, &e->acc_ballot, sizeof ballot);
        memcpy(body + 2 * sizeof ballot, e->acc_value, bm);
        fill_failed(c, (uint64_t *)(body + 2 * sizeof ballot + bm));
        send_frame(c, from, MSG_PROMISE, e->epoch, body, 2 * sizeof ballot + 2 * bm, NULL, 0);
        free(body);
      }
    } else if (type == MSG_ACCEPT && ballot >= e->promised && len >= sizeof ballot + bm) {
      e->promised = ballot;
      e->acc_ballot = ballot;
      memcpy(e->acc_value, payload + sizeof ballot, bm);
      send_frame(c, from, MSG_ACCEPTED, e->epoch, &ballot, sizeof ballot, NULL, 0);
    } else {
      fill_failed(c, failed);
      send_frame(c, from, MSG_NACK, e->epoch, &e->promised, sizeof e->promised, failed, bm);
    }
    break;
  case MSG_PROMISE:
    if (len < 2 * sizeof ballot + 2 * bm)
      break;
    if (e->leading && e->phase == 1 && ballot == e->ballot) {
      uint32_t acc;
      memcpy(&acc, payload + sizeof ballot, sizeof acc);
      if (acc > e->best_ballot) {
        e->best_ballot = acc;
        memcpy(e->best_value, payload + 2 * sizeof ballot, bm);
      }
      set_bit(e->replied, from);
    }
    /* last: merging can close connections, the sender's included, and free the payload */
    memcpy(failed, payload + 2 * sizeof ballot + bm, bm);
    merge_failed(c, failed, from);
    break;
  case MSG_NACK:
    if (len >= sizeof ballot + bm) {
      memcpy(failed, payload + sizeof ballot, bm);
      merge_failed(c, failed, from);
    }
    if (e->leading && ballot > e->ballot) {
      e->leading = false; /* someone promised a higher ballot: retry above it */
      if (ballot > e->promised)
        e->promised = ballot;
    }
    break;
  case MSG_ACCEPTED:
    if (e->leading && e->phase == 2 && ballot == e->ballot)
      set_bit(e->replied, from);
    break;
  case MSG_COMMIT:
    if (!e->committed && len >= bm) {
      commit(c, e, (const uint64_t *)payload);
      /* pass it on once: the leader may have died halfway through its broadcast, and a
       * committed rank never leads, so the others would wait for a decision forever */
      send_all(c, MSG_COMMIT, e->epoch, e->value, bm, NULL, 0);
    }
    break;
  }
  free(failed);
  agree_progress(c, e);
}

/* ---- receiving ---- */

static void on_frame(mc_ctrl_t *c, int from, const frame_hdr_t *h, const char *payload) {
  peer_t *p = &c->peers[from];
  size_t len = h->len;
  switch (h->type) {
  case MSG_HEARTBEAT: break;
  case MSG_BYE:
    p->left = true;
    p->left_deadline = mc_now_ns() + (int64_t)c->failure_timeout_ms * 1000000;
    break;
  case MSG_FAILED: {
    uint32_t who;
    if (h->len < sizeof who)
      break;
    memcpy(&who, payload, sizeof who);
    char why[200];
    snprintf(why, sizeof why, "reported by original rank %d: %.*s", from,
             (int)(h->len - sizeof who), payload + sizeof who);
    if (who >= (uint32_t)c->size)
      break;
    if ((int)who != c->rank) {
      mark_failed(c, (int)who, why, true);
      break;
    }
    payload += sizeof who; /* about this rank: as EXCLUDED, with the reason after the rank */
    len -= sizeof who;
  }
    /* fall through */
  case MSG_EXCLUDED:
    if (!c->excluded) {
      c->excluded = true;
      snprintf(c->excluded_why, sizeof c->excluded_why,
               "original rank %d declared this rank failed (%.*s)", from, (int)len, payload);
      MC_LOG(MC_LOG_WARN, c->rank, "control: %s", c->excluded_why);
      revoke_comms(c, -1, MC_ERR_REVOKED, c->excluded_why);
      pthread_cond_broadcast(&c->cond);
    }
    break;
  case MSG_REVOKE: {
    char why[MC_ERRLEN];
    snprintf(why, sizeof why, "revoked by original rank %d: %.*s", from, (int)h->len, payload);
    for (attached_t *a = c->comms; a; a = a->next)
      if (a->comm->epoch == h->epoch)
        mc_comm_revoke_local(a->comm, MC_ERR_REVOKED, why);
    break;
  }
  case MSG_ADDR: {
    if (!h->len) { /* it withdrew: its shrink failed after the agreement */
      mark_failed(c, from, "it could not join the shrunk communicator", true);
      break;
    }
    epoch_state_t *e = epoch_get(c, h->epoch);
    char *copy = e ? malloc(h->len) : NULL;
    if (copy) { /* a newer address (a retried shrink) replaces an unused one */
      memcpy(copy, payload, h->len);
      free(e->addr[from]);
      e->addr[from] = copy;
      e->addr_len[from] = h->len;
      pthread_cond_broadcast(&c->cond);
    }
    break;
  }
  case MSG_STANDBY: {
    epoch_state_t *e = epoch_get(c, h->epoch);
    char *copy = e ? malloc(h->len + 1) : NULL;
    if (copy) {
      memcpy(copy, payload, h->len);
      free(e->standby[from]);
      e->standby[from] = copy;
      e->standby_len[from] = h->len;
      pthread_cond_broadcast(&c->cond);
    }
    break;
  }
  default: {
    epoch_state_t *e =
        h->type >= MSG_PREPARE && h->type <= MSG_COMMIT ? epoch_get(c, h->epoch) : NULL;
    if (e)
      on_agreement(c, from, h->type, e, payload, h->len);
  }
  }
}

/* HELLO on an accepted connection: the secret proves it is one of ours. */
static bool on_hello(mc_ctrl_t *c, conn_t *conn, const frame_hdr_t *h, const char *payload) {
  struct {
    uint64_t secret;
    uint32_t rank, size;
  } hello;
  if (h->type != MSG_HELLO || h->len != sizeof hello)
    return false;
  memcpy(&hello, payload, sizeof hello);
  int r = (int)hello.rank;
  if (hello.secret != c->secret || (int)hello.size != c->size || r <= c->rank || r >= c->size ||
      c->peers[r].conn || c->peers[r].failed)
    return false;
  conn->peer = r;
  c->peers[r].conn = conn;
  c->peers[r].last_rx = mc_now_ns();
  c->connected++;
  pthread_cond_broadcast(&c->cond);
  return true;
}

static void unlink_pending(mc_ctrl_t *c, conn_t *conn) {
  for (conn_t **l = &c->pending; *l; l = &(*l)->next_pending)
    if (*l == conn) {
      *l = conn->next_pending;
      return;
    }
}

static void on_readable(mc_ctrl_t *c, conn_t *conn) {
  bool lost = false;
  for (;;) {
    if (conn->cap - conn->used < 4096) {
      size_t cap = conn->cap ? conn->cap * 2 : 8192;
      char *b = realloc(conn->buf, cap);
      if (!b)
        break;
      conn->buf = b, conn->cap = cap;
    }
    ssize_t n = recv(conn->fd, conn->buf + conn->used, conn->cap - conn->used, MSG_DONTWAIT);
    if (n > 0) {
      conn->used += n;
    } else {
      lost = n == 0 || (errno != EAGAIN && errno != EINTR);
      break;
    }
  }
  /* frames that arrived before the end of the stream count (e.g. a COMMIT sent just before
   * the peer died) */
  size_t off = 0;
  frame_hdr_t h;
  while (conn->used - off >= sizeof h) {
    memcpy(&h, conn->buf + off, sizeof h);
    if (h.len > MAX_PAYLOAD) {
      lost = true; /* not our protocol */
      break;
    }
    if (conn->used - off < sizeof h + h.len)
      break;
    const char *payload = conn->buf + off + sizeof h;
    off += sizeof h + h.len;
    if (conn->peer < 0) {
      unlink_pending(c, conn);
      if (!on_hello(c, conn, &h, payload)) {
        conn_close(c, conn);
        return;
      }
      continue;
    }
    int from = conn->peer;
    c->peers[from].last_rx = mc_now_ns();
    on_frame(c, from, &h, payload);
    if (c->peers[from].conn != conn)
      return; /* closed while handling the frame */
  }
  memmove(conn->buf, conn->buf + off, conn->used - off);
  conn->used -= off;
  if (!lost)
    return;
  if (conn->peer < 0) {
    unlink_pending(c, conn);
    conn_close(c, conn);
    return;
  }
  peer_t *p = &c->peers[conn->peer];
  if (p->left) { /* a goodbye, then the process exited: fails after the grace period */
    conn_close(c, conn);
    p->conn = NULL;
    return;
  }
  mark_failed(c, conn->peer, "its control connection closed (the process exited or was killed)",
              true);
}

static void on_accept(mc_ctrl_t *c) {
  for (;;) {
    int fd = accept4(c->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
      return;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    conn_t *conn = calloc(1, sizeof *conn);
    if (!conn) {
      close(fd);
      continue;
    }
    conn->fd = fd;
    conn->peer = -1;
    conn->next_pending = c->pending;
    c->pending = conn;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = conn};
    epoll_ctl(c->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
  }
}

/* Heartbeats out; silence and expired goodbyes in. */
static void tick(mc_ctrl_t *c, int64_t now, int64_t since_last_tick) {
  const int64_t hb = (int64_t)c->heartbeat_ms * 1000000;
  const int64_t limit = (int64_t)c->failure_timeout_ms * 1000000;
  if (since_last_tick - hb > limit / 2) {
    /* this thread did not run for a long time (stopped, starved): the silence is ours, not
     * the peers'. What they sent meanwhile is read first; they get a fresh window. */
    MC_LOG(MC_LOG_INFO, c->rank, "control: this rank did not run for %lld ms",
           (long long)(since_last_tick / 1000000));
    for (int r = 0; r < c->size; r++)
      if (c->peers[r].conn && !c->peers[r].failed)
        on_readable(c, c->peers[r].conn);
    for (int r = 0; r < c->size; r++)
      if (c->peers[r].last_rx < now)
        c->peers[r].last_rx = now;
  }
  for (int r = 0; r < c->size; r++) {
    peer_t *p = &c->peers[r];
    if (r == c->rank || p->failed)
      continue;
    if (p->left && now >= p->left_deadline) {
      mark_failed(c, r, "it left (destroyed its communicator)", false);
      continue;
    }
    if (!p->conn)
      continue;
    if (now - p->last_tx >= hb / 2)
      send_frame(c, r, MSG_HEARTBEAT, 0, NULL, 0, NULL, 0);
    if (c->ready && !p->left && now - p->last_rx > limit) {
      char why[96];
      snprintf(why, sizeof why, "no heartbeat for %lld ms (hung, stopped or cut off)",
               (long long)((now - p->last_rx) / 1000000));
      p->silent = true;
      mark_failed(c, r, why, true);
    }
  }
}

static void *ctrl_main(void *arg) {
  mc_ctrl_t *c = arg;
  pthread_setname_np(pthread_self(), "mc-ctrl"); /* names shown by top -H, gdb, perf */
  const int64_t hb = (int64_t)c->heartbeat_ms * 1000000;
  int64_t last_tick = mc_now_ns(), next_tick = last_tick + hb;
  struct epoll_event evs[32];
  for (;;) {
    int64_t wait_ns = next_tick - mc_now_ns();
    int timeout = wait_ns <= 0 ? 0 : (int)(wait_ns / 1000000) + 1;
    int n = epoll_wait(c->epoll_fd, evs, 32, timeout);
    pthread_mutex_lock(&c->lock);
    if (c->stop) {
      pthread_mutex_unlock(&c->lock);
      break;
    }
    for (int i = 0; i < n; i++) {
      void *ptr = evs[i].data.ptr;
      if (ptr == &c->listen_fd) {
        on_accept(c);
      } else if (ptr == &c->wake_fd) {
        uint64_t v;
        ssize_t r = read(c->wake_fd, &v, sizeof v);
        (void)r;
      } else {
        /* the connection may have been closed by an earlier event of this batch */
        conn_t *conn = ptr;
        bool live = false;
        for (int r = 0; r < c->size && !live; r++)
          live = c->peers[r].conn == conn;
        for (conn_t *q = c->pending; q && !live; q = q->next_pending)
          live = q == conn;
        if (live)
          on_readable(c, conn);
      }
    }
    int64_t now = mc_now_ns();
    if (now >= next_tick) {
      tick(c, now, now - last_tick);
      last_tick = now;
      next_tick = now + hb;
    }
    pthread_mutex_unlock(&c->lock);
  }
  return NULL;
}

/* ---- set-up ---- */

/* The address peers should use: loopback when every rank is here, else MC_OFI_IFACE's address
 * or the first non-loopback IPv4 address that is up. */
static bool local_ip(bool loopback, char *out, size_t len) {
  if (loopback) {
    snprintf(out, len, "127.0.0.1");
    return true;
  }
  const char *want = mc_param_str(MC_PARAM_OFI_IFACE);
  struct ifaddrs *list, *i;
  if (getifaddrs(&list))
    return false;
  bool found = false;
  for (i = list; i && !found; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET || !(i->ifa_flags & IFF_UP))
      continue;
    if (*want ? strcmp(i->ifa_name, want) != 0 : (i->ifa_flags & IFF_LOOPBACK) != 0)
      continue;
    found = inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, out, len) != NULL;
  }
  freeifaddrs(list);
  return found;
}

mc_status_t mc_ctrl_create(int rank, int size, uint64_t secret, bool loopback, mc_ctrl_t **out,
                           char *addr, size_t addrlen, char *err, size_t errlen) {
  mc_ctrl_t *c = calloc(1, sizeof *c);
  if (!c)
    return MC_ERR_NOMEM;
  c->rank = rank, c->size = size, c->secret = secret;
  c->words = (size + 63) / 64;
  c->heartbeat_ms = (int)mc_param_int(MC_PARAM_HEARTBEAT_MS);
  c->failure_timeout_ms = (int)mc_param_int(MC_PARAM_FAILURE_TIMEOUT_MS);
  /* a silence must span several heartbeats, and the stall grace in tick() needs room */
  if (c->failure_timeout_ms < 3)
    c->failure_timeout_ms = 3;
  if (c->heartbeat_ms < 1 || c->heartbeat_ms > c->failure_timeout_ms / 3)
    c->heartbeat_ms = c->failure_timeout_ms / 3 > 0 ? c->failure_timeout_ms / 3 : 1;
  c->listen_fd = c->epoll_fd = c->wake_fd = -1;
  c->peers = calloc(size, sizeof *c->peers);
  pthread_mutex_init(&c->lock, NULL);
  pthread_condattr_t attr;
  pthread_condattr_init(&attr);
  pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
  pthread_cond_init(&c->cond, &attr);
  pthread_condattr_destroy(&attr);

  char ip[64];
  struct sockaddr_in sa = {.sin_family = AF_INET};
  socklen_t slen = sizeof sa;
  const char *what = "out of memory";
  if (!c->peers)
    goto fail;
  what = "no usable IPv4 address (set MC_OFI_IFACE)";
  if (!local_ip(loopback, ip, sizeof ip))
    goto fail;
  what = "cannot listen on a TCP port";
  inet_pton(AF_INET, ip, &sa.sin_addr);
  if ((c->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0 ||
      bind(c->listen_fd, (struct sockaddr *)&sa, sizeof sa) || listen(c->listen_fd, SOMAXCONN) ||
      getsockname(c->listen_fd, (struct sockaddr *)&sa, &slen))
    goto fail;
  what = "cannot create the control thread";
  c->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (c->epoll_fd < 0 || c->wake_fd < 0)
    goto fail;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->listen_fd};
  epoll_ctl(c->epoll_fd, EPOLL_CTL_ADD, c->listen_fd, &ev);
  ev.data.ptr = &c->wake_fd;
  epoll_ctl(c->epoll_fd, EPOLL_CTL_ADD, c->wake_fd, &ev);
  if (pthread_create(&c->thread, NULL, ctrl_main, c))
    goto fail;
  snprintf(addr, addrlen, "%s:%u", ip, (unsigned)ntohs(sa.sin_port));
  *out = c;
  return MC_OK;
fail:
  snprintf(err, errlen, "control plane: %s (%s)", what, strerror(errno));
  if (c->listen_fd >= 0)
    close(c->listen_fd);
  if (c->epoll_fd >= 0)
    close(c->epoll_fd);
  if (c->wake_fd >= 0)
    close(c->wake_fd);
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->cond);
  free(c->peers);
  free(c);
  return MC_ERR_TRANSPORT;
}

static void deadline_ts(struct timespec *ts, int timeout_ms) {
  clock_gettime(CLOCK_MONOTONIC, ts);
  ts->tv_sec += timeout_ms / 1000;
  ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000;
  if (ts->tv_nsec >= 1000000000L)
    ts->tv_sec++, ts->tv_nsec -= 1000000000L;
}

static int dial(const char *addr, int timeout_ms) {
  char host[64];
  const char *colon = strrchr(addr, ':');
  if (!colon || (size_t)(colon - addr) >= sizeof host)
    return -1;
  memcpy(host, addr, colon - addr);
  host[colon - addr] = 0;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
  if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
    return -1;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) && errno != EINPROGRESS) {
    close(fd);
    return -1;
  }
  struct pollfd p = {fd, POLLOUT, 0};
  int soerr = 0;
  socklen_t sl = sizeof soerr;
  if (poll(&p, 1, timeout_ms) != 1 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) || soerr) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

mc_status_t mc_ctrl_connect(mc_ctrl_t *c, char *const *addrs, int timeout_ms, char *err,
                            size_t errlen) {
  /* connections go from the higher rank to the lower one; the lower one accepts */
  for (int r = 0; r < c->rank; r++) {
    int fd = dial(addrs[r], timeout_ms);
    conn_t *conn = fd >= 0 ? calloc(1, sizeof *conn) : NULL;
    if (!conn) {
      if (fd >= 0)
        close(fd);
      snprintf(err, errlen, "control plane: cannot connect to rank %d at %s", r, addrs[r]);
      return MC_ERR_PEER_FAILED;
    }
    conn->fd = fd;
    conn->peer = r;
    pthread_mutex_lock(&c->lock);
    c->peers[r].conn = conn;
    c->peers[r].last_rx = mc_now_ns();
    c->connected++;
    struct {
      uint64_t secret;
      uint32_t rank, size;
    } hello = {c->secret, (uint32_t)c->rank, (uint32_t)c->size};
    send_frame(c, r, MSG_HELLO, 0, &hello, sizeof hello, NULL, 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = conn};
    epoll_ctl(c->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
    pthread_mutex_unlock(&c->lock);
  }
  struct timespec ts;
  deadline_ts(&ts, timeout_ms);
  mc_status_t st = MC_OK;
  pthread_mutex_lock(&c->lock);
  while (c->connected < c->size - 1 && st == MC_OK) {
    for (int r = 0; r < c->size; r++)
      if (c->peers[r].failed) {
        snprintf(err, errlen, "control plane: rank %d failed while connecting: %s", r,
                 c->peers[r].why);
        st = MC_ERR_PEER_FAILED;
      }
    if (st == MC_OK && pthread_cond_timedwait(&c->cond, &c->lock, &ts) == ETIMEDOUT &&
        c->connected < c->size - 1) {
      snprintf(err, errlen, "control plane: only %d of %d peers connected within %d ms",
               c->connected, c->size - 1, timeout_ms);
      st = MC_ERR_TIMEOUT;
    }
  }
  int64_t now = mc_now_ns();
  for (int r = 0; r < c->size; r++)
    c->peers[r].last_rx = now; /* silence counts from here */
  c->ready = st == MC_OK;
  pthread_mutex_unlock(&c->lock);
  return st;
}

void mc_ctrl_attach(mc_ctrl_t *c, mc_comm_t *comm) {
  attached_t *a = calloc(1, sizeof *a);
  pthread_mutex_lock(&c->lock);
  if (a) {
    a->comm = comm;
    a->next = c->comms;
    c->comms = a;
  }
  /* a member that failed before the communicator existed fails it at once */
  for (int r = 0; r < c->size; r++)
    if (c->peers[r].failed && comm->rank_of[r] >= 0) {
      char msg[MC_ERRLEN];
      snprintf(msg, sizeof msg, "rank %d failed: %s", comm->rank_of[r], c->peers[r].why);
      mc_comm_revoke_local(comm, MC_ERR_PEER_FAILED, msg);
      break;
    }
  if (c->excluded)
    mc_comm_revoke_local(comm, MC_ERR_REVOKED, c->excluded_why);
  epochs_prune(c, comm->epoch);
  pthread_mutex_unlock(&c->lock);
}

static void ctrl_free(mc_ctrl_t *c) {
  uint64_t one = 1;
  pthread_mutex_lock(&c->lock);
  c->stop = true;
  send_all(c, MSG_BYE, 0, NULL, 0, NULL, 0);
  pthread_mutex_unlock(&c->lock);
  ssize_t n = write(c->wake_fd, &one, sizeof one);
  (void)n;
  pthread_join(c->thread, NULL);
  for (int r = 0; r < c->size; r++)
    if (c->peers[r].conn)
      conn_close(c, c->peers[r].conn);
  while (c->pending) {
    conn_t *conn = c->pending;
    c->pending = conn->next_pending;
    conn_close(c, conn);
  }
  while (c->epochs) {
    epoch_state_t *e = c->epochs;
    c->epochs = e->next;
    epoch_free(c, e);
  }
  close(c->listen_fd);
  close(c->epoll_fd);
  close(c->wake_fd);
  pthread_mutex_destroy(&c->lock);
  pthread_cond_destroy(&c->cond);
  free(c->peers);
  free(c);
}

void mc_ctrl_detach(mc_ctrl_t *c, mc_comm_t *comm) {
  pthread_mutex_lock(&c->lock);
  for (attached_t **l = &c->comms; *l; l = &(*l)->next)
    if ((*l)->comm == comm) {
      attached_t *a = *l;
      *l = a->next;
      free(a);
      break;
    }
  bool last = c->comms == NULL;
  pthread_mutex_unlock(&c->lock);
  if (last)
    ctrl_free(c);
}

/* ---- operations for communicators ---- */

void mc_ctrl_revoke(mc_ctrl_t *c, uint32_t epoch, const char *why) {
  pthread_mutex_lock(&c->lock);
  send_all(c, MSG_REVOKE, epoch, why, strlen(why), NULL, 0);
  pthread_mutex_unlock(&c->lock);
}

void mc_ctrl_exclude(mc_ctrl_t *c, int rank, const char *why) {
  pthread_mutex_lock(&c->lock);
  mark_failed(c, rank, why, true);
  pthread_mutex_unlock(&c->lock);
}

bool mc_ctrl_failure(mc_ctrl_t *c, int rank, char *why, size_t len) {
  pthread_mutex_lock(&c->lock);
  bool failed = c->peers[rank].failed;
  if (failed && why)
    snprintf(why, len, "%s", c->peers[rank].why);
  pthread_mutex_unlock(&c->lock);
  return failed;
}

bool mc_ctrl_is_failed(mc_ctrl_t *c, int rank) { return mc_ctrl_failure(c, rank, NULL, 0); }

mc_status_t mc_ctrl_agree(mc_ctrl_t *c, uint32_t epoch, const int *members, int n, int timeout_ms,
                          uint64_t *failed, char *err, size_t errlen) {
  struct timespec ts;
  deadline_ts(&ts, timeout_ms);
  mc_status_t st = MC_OK;
  pthread_mutex_lock(&c->lock);
  epoch_state_t *e = epoch_get(c, epoch);
  if (!e) {
    pthread_mutex_unlock(&c->lock);
    snprintf(err, errlen, "agreement: out of memory");
    return MC_ERR_NOMEM;
  }
  for (int i = 0; i < n; i++)
    set_bit(e->members, members[i]);
  e->joined = true;
  /* Every other member gone, at least one through this rank's own timeout: more likely this
   * rank was cut off than all the others failed. Going on alone could split the job. */
  bool alone = true, silence = false;
  for (int i = 0; i < n; i++)
    if (members[i] != c->rank) {
      alone &= c->peers[members[i]].failed;
      silence |= c->peers[members[i]].silent;
    }
  if (alone && silence && n > 1 && !c->excluded) {
    c->excluded = true;
    snprintf(c->excluded_why, sizeof c->excluded_why,
             "this rank heard from no other rank (cut off?): it cannot go on alone");
    revoke_comms(c, -1, MC_ERR_REVOKED, c->excluded_why);
  }
  agree_progress(c, e);
  while (!e->committed && !c->excluded && st == MC_OK)
    if (pthread_cond_timedwait(&c->cond, &c->lock, &ts) == ETIMEDOUT && !e->committed) {
      int coord = coordinator(c, e);
      snprintf(err, errlen, "agreement timed out after %d ms (coordinator: rank %d%s)", timeout_ms,
               coord, coord == c->rank ? ", this rank, waiting for replies" : "");
      st = MC_ERR_TIMEOUT;
    }
  if (st == MC_OK && !e->committed) {
    snprintf(err, errlen, "%s", c->excluded_why);
    st = MC_ERR_REVOKED;
  }
  if (st == MC_OK)
    memcpy(failed, e->value, c->words * sizeof *failed);
  pthread_mutex_unlock(&c->lock);
  return st;
}

mc_status_t mc_ctrl_exchange(mc_ctrl_t *c, uint32_t epoch, const int *members, int n,
                             const void *addr, size_t len, int timeout_ms, void **addrs,
                             size_t *lens, char *err, size_t errlen) {
  struct timespec ts;
  deadline_ts(&ts, timeout_ms);
  mc_status_t st = MC_OK;
  pthread_mutex_lock(&c->lock);
  epoch_state_t *e = epoch_get(c, epoch);
  if (!e) {
    pthread_mutex_unlock(&c->lock);
    return MC_ERR_NOMEM;
  }
  for (int i = 0; i < n; i++)
    if (members[i] != c->rank)
      send_frame(c, members[i], MSG_ADDR, epoch, addr, len, NULL, 0);
  for (;;) {
    int missing = -1;
    for (int i = 0; i < n && missing < 0; i++) {
      int r = members[i];
      if (r != c->rank && !e->addr[r] && !c->peers[r].failed)
        missing = r;
    }
    if (missing < 0)
      break;
    if (pthread_cond_timedwait(&c->cond, &c->lock, &ts) == ETIMEDOUT) {
      snprintf(err, errlen, "address exchange: rank %d sent nothing within %d ms", missing,
               timeout_ms);
      st = MC_ERR_TIMEOUT;
      break;
    }
  }
  for (int i = 0; i < n && st == MC_OK; i++) {
    int r = members[i];
    addrs[i] = NULL, lens[i] = 0;
    if (r == c->rank || !e->addr[r])
      continue;
    addrs[i] = e->addr[r], lens[i] = e->addr_len[r];
    e->addr[r] = NULL; /* ownership moves to the caller */
  }
  pthread_mutex_unlock(&c->lock);
  return st;
}

void mc_ctrl_withdraw(mc_ctrl_t *c, uint32_t epoch, const int *members, int n) {
  pthread_mutex_lock(&c->lock);
  for (int i = 0; i < n; i++)
    if (members[i] != c->rank)
      send_frame(c, members[i], MSG_ADDR, epoch, NULL, 0, NULL, 0);
  pthread_mutex_unlock(&c->lock);
}

void mc_ctrl_kick(mc_ctrl_t *c) {
  pthread_mutex_lock(&c->lock);
  pthread_cond_broadcast(&c->cond);
  pthread_mutex_unlock(&c->lock);
}

mc_status_t mc_ctrl_standby_exchange(mc_ctrl_t *c, uint32_t epoch, const int *members, int n,
                                     const void *addr, size_t len, const atomic_bool *stop,
                                     int timeout_ms, void **addrs, size_t *lens) {
  struct timespec ts;
  deadline_ts(&ts, timeout_ms);
  mc_status_t st = MC_OK;
  pthread_mutex_lock(&c->lock);
  epoch_state_t *e = epoch_get(c, epoch);
  if (!e) {
    pthread_mutex_unlock(&c->lock);
    return MC_ERR_NOMEM;
  }
  for (int i = 0; i < n; i++)
    if (members[i] != c->rank)
      send_frame(c, members[i], MSG_STANDBY, epoch, addr, len, NULL, 0);
  if (!addr) {
    pthread_mutex_unlock(&c->lock);
    return MC_ERR_UNSUPPORTED;
  }
  for (;;) {
    bool missing = false;
    for (int i = 0; i < n && !missing; i++) {
      int r = members[i];
      missing = r != c->rank && !e->standby[r] && !c->peers[r].failed;
    }
    if (!missing)
      break;
    if (atomic_load(stop) || c->excluded ||
        pthread_cond_timedwait(&c->cond, &c->lock, &ts) == ETIMEDOUT) {
      st = MC_ERR_TIMEOUT;
      break;
    }
  }
  for (int i = 0; i < n; i++) {
    int r = members[i];
    addrs[i] = NULL, lens[i] = 0;
    if (st != MC_OK || r == c->rank || c->peers[r].failed || !e->standby[r])
      continue;
    if (!e->standby_len[r]) {
      st = MC_ERR_UNSUPPORTED; /* a member has no standby: nobody pre-connects */
      continue;
    }
    if ((addrs[i] = malloc(e->standby_len[r])) != NULL) {
      memcpy(addrs[i], e->standby[r], e->standby_len[r]);
      lens[i] = e->standby_len[r];
    }
  }
  pthread_mutex_unlock(&c->lock);
  return st;
}
