/* Intra-host collectives over shared memory (csrc/shm.h).
 *
 * Every rank owns one segment: a header of flags and double-buffered slots. A rank writes only
 * its own segment and reads its peers' (mapped read-only), so a dead or stopped peer can never
 * corrupt this rank's memory. Operations are cut into chunks that fit a slot; chunk number t
 * counts across the communicator's shm operations and uses slot t % 2. Three monotonic flags
 * per rank say how far it got:
 *   arrived   its input of chunk t is in slot[t % 2] (with the operation's signature)
 *   reduced   its slice of chunk t is reduced, in red[t % 2] (allreduce, two-phase)
 *   released  it has finished reading its peers' buffers of chunk t
 * A rank writes slot[t % 2] again only when every peer has released t - 2: flags instead of
 * barriers, and two chunks in flight.
 *
 * Algorithms: allreduce "flat" (small: every rank reduces all inputs itself, one sync) and
 * "two-phase" (each rank reduces a 1/n slice, the others copy it: reduce-scatter + allgather,
 * two syncs); reduce_scatter (each rank reduces its block from the peers' slots); allgather and
 * broadcast (copy from the peers' slots); barrier (flags only).
 *
 * Single copy (CMA): from MC_SHM_CMA_MIN bytes on (cma_threshold), an operation skips the slots.
 * Each rank publishes the addresses of its buffers with its arrival, and every rank reads what it
 * needs straight from its peers' buffers with process_vm_readv (reductions through a small local
 * piece buffer), then releases; an operation completes once every peer has released it
 * (PH_DRAIN), since until then a peer may still be reading this rank's buffers. Whether the
 * kernel lets a rank read its peers' memory is probed once, at attach (a random word each rank
 * exposes); a rank publishes the result before its first arrival, so after the first operation
 * every rank sees every result and all make the same choice (the first operation always uses
 * the slots).
 *
 * Leaving: a rank whose communicator breaks (revoke, failure, destroy) sets `revoked`. A
 * peer still waiting for a chunk that rank had not released fails at once instead of using
 * flags and slots the rank abandoned (a stopped rank that resumes after the others gave up
 * on an operation must not run it against their leftovers).
 *
 * Sleeping: a waiting rank spins briefly (the progress loop), then sets its `sleeping` flag
 * and blocks in poll() on a FIFO; a rank that sets a flag writes a byte to every sleeping
 * peer's FIFO. Both sides check after writing, so no wake-up is lost. */
#define _GNU_SOURCE
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"
#include "internal.h"
#include "log.h"
#include "reduce.h"

#define SHM_MAGIC 0x6d63736d68ULL /* "mcshm" */
#define HEADER_BYTES 4096

typedef struct {
  _Alignas(64) _Atomic uint64_t arrived;
  _Alignas(64) _Atomic uint64_t reduced;
  _Alignas(64) _Atomic uint64_t released;
  _Alignas(64) _Atomic uint32_t sleeping;
  _Atomic uint32_t revoked; /* set once its communicator is revoked or destroyed: no flag moves
                               again, and whatever chunk it had not released it abandoned */
  int32_t left_status;      /* why, written before `revoked` */
  char left_why[256];
  _Alignas(64) _Atomic uint32_t cma; /* CMA_YES: this rank can read every peer's memory */
  int32_t pid;
  uint64_t cma_min;               /* this rank's MC_SHM_CMA_MIN: all must agree to use it */
  uint64_t nonce, nonce_addr;     /* a random word, and its address in this rank's memory */
  uint64_t buf_in[2], buf_out[2]; /* the operation's buffers, for the arrival in slot t % 2 */
  _Alignas(64) uint64_t sig[2];   /* signature of the operation whose chunk is in slot[i] */
  uint32_t single[2];             /* and whether it runs single copy (checked with it) */
  uint32_t seq[2];                /* and its sequence number */
  uint64_t magic;
  uint64_t slot_bytes;
} shm_header_t;

_Static_assert(sizeof(shm_header_t) <= HEADER_BYTES, "shm header too large");

typedef struct {
  const shm_header_t *hdr; /* own: writable through self */
  const char *base;
  int wake_fd; /* write end of the peer's FIFO */
} shm_peer_t;

struct mc_shm {
  int n, me;      /* this host's ranks, numbered within the group */
  const int *grp; /* the communicator rank of each (comm->local) */
  size_t slot_bytes, map_bytes, flat_max;
  shm_header_t *self;
  char *self_base;
  shm_peer_t *peer;  /* n entries, own included */
  const void **srcs; /* n entries: the inputs of one reduction */
  char seg_name[80], wake_path[96];
  int wake_rd; /* own FIFO, opened read-write so that it never reports EOF */
  bool attached, unlinked;
  uint64_t next_t; /* chunk number the next operation starts at */
  size_t cma_min;  /* bytes from which an operation reads its peers' buffers; 0: never */
  int cma_all;     /* -1 until the first arrival, then whether every rank can (same on all) */
  char *piece;     /* reductions' local copies of peer data: n - 1 pieces of piece_bytes */
  size_t piece_bytes;
};

enum { PH_START, PH_ARRIVED, PH_REDUCED, PH_DRAIN };
enum { CMA_UNKNOWN, CMA_YES, CMA_NO };
enum { ALG_FLAT = 1, ALG_TWO_PHASE };

/* Layout after the header: slot[0], slot[1], red[0], red[1], each slot_bytes. */
static char *slot_of(char *base, size_t slot_bytes, uint64_t t) {
  return base + HEADER_BYTES + (t & 1) * slot_bytes;
}
static char *red_of(char *base, size_t slot_bytes, uint64_t t) {
  return base + HEADER_BYTES + (2 + (t & 1)) * slot_bytes;
}

/* Segment and FIFO names of communicator rank `rank`. */
static void names(const mc_comm_t *comm, int rank, char *seg, size_t seglen, char *wake,
                  size_t wakelen) {
  unsigned long long id = (unsigned long long)comm->id;
  snprintf(seg, seglen, "/mooncake-%016llx-%u-%d", id, comm->epoch, comm->members[rank]);
  snprintf(wake, wakelen, "/dev/shm/mooncake-%016llx-%u-%d.wake", id, comm->epoch,
           comm->members[rank]);
}

/* Are large buffers likely backed by 2 MiB pages: torch's THP_MEM_ALLOC_ENABLE=1 (its
 * allocator advises them from 2 MiB on), or transparent huge pages "always"? */
static bool huge_pages_likely(void) {
  const char *torch = getenv("THP_MEM_ALLOC_ENABLE");
  if (torch && atoi(torch) > 0)
    return true;
  char mode[128] = "";
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (f) {
    if (!fgets(mode, sizeof mode, f))
      mode[0] = 0;
    fclose(f);
  }
  return strstr(mode, "[always]") != NULL;
}

/* MC_SHM_CMA_MIN: bytes from which operations read their peers' buffers, 0 for never. "auto":
 * 2 MiB where huge pages are likely, else never. The kernel walks and pins each page of a
 * process_vm_readv: with 4 KiB pages that made it 1.1-1.9x slower than the two copies through
 * the slots on a 2-core VM, with 2 MiB pages 10-40 % faster (docs/performance.md). */
static size_t cma_threshold(void) {
  const char *v = mc_param_str(MC_PARAM_SHM_CMA_MIN);
  if (!strcmp(v, "auto"))
    return huge_pages_likely() ? (size_t)2 << 20 : 0;
  long long bytes = strtoll(v, NULL, 10);
  return bytes > 0 ? (size_t)bytes : 0;
}

mc_status_t mc_shm_create(mc_comm_t *comm, char *err, size_t errlen) {
  mc_shm_t *s = calloc(1, sizeof *s);
  if (!s || !(s->peer = calloc(comm->local_ranks, sizeof *s->peer)) ||
      !(s->srcs = calloc(comm->local_ranks, sizeof *s->srcs))) {
    if (s)
      free(s->peer);
    free(s);
    snprintf(err, errlen, "out of memory");
    return MC_ERR_NOMEM;
  }
  s->n = comm->local_ranks;
  s->grp = comm->local;
  for (int r = 0; r < s->n; r++)
    if (comm->local[r] == comm->rank)
      s->me = r;
  s->slot_bytes = (size_t)mc_param_int(MC_PARAM_SHM_SLOT_BYTES);
  if (s->slot_bytes < 4096)
    s->slot_bytes = 4096;
  s->slot_bytes &= ~(size_t)63;
  s->flat_max = (size_t)mc_param_int(MC_PARAM_SHM_FLAT_MAX);
  s->cma_min = cma_threshold();
  s->cma_all = -1;
  s->map_bytes = HEADER_BYTES + 4 * s->slot_bytes;
  s->wake_rd = -1;
  s->next_t = 1;
  for (int r = 0; r < s->n; r++)
    s->peer[r].wake_fd = -1;
  names(comm, comm->rank, s->seg_name, sizeof s->seg_name, s->wake_path, sizeof s->wake_path);

  const char *what = "shm_open";
  int fd = shm_open(s->seg_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd >= 0) {
    what = "ftruncate";
    if (ftruncate(fd, (off_t)s->map_bytes) == 0) {
      what = "mmap";
      void *p = mmap(NULL, s->map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED)
        s->self_base = p;
    }
    close(fd);
  }
  if (s->self_base) {
    what = "mkfifo";
    if (mkfifo(s->wake_path, 0600) == 0)
      s->wake_rd = open(s->wake_path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
  }
  if (!s->self_base || s->wake_rd < 0) {
    snprintf(err, errlen, "%s for %s failed: %s", what, s->seg_name, strerror(errno));
    if (s->self_base) {
      munmap(s->self_base, s->map_bytes);
      unlink(s->wake_path);
    }
    shm_unlink(s->seg_name);
    free(s->peer);
    free(s->srcs);
    free(s);
    return MC_ERR_TRANSPORT;
  }
  s->self = (shm_header_t *)s->self_base;
  s->self->magic = SHM_MAGIC;
  s->self->slot_bytes = s->slot_bytes;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  s->self->pid = (int32_t)getpid();
  s->self->cma_min = s->cma_min;
  s->self->nonce = ((uint64_t)ts.tv_nsec << 32 ^ (uint64_t)ts.tv_sec ^ (uintptr_t)s) | 1;
  s->self->nonce_addr = (uintptr_t)&s->self->nonce;
  s->peer[s->me].hdr = s->self;
  s->peer[s->me].base = s->self_base;
  comm->shm = s;
  return MC_OK;
}

static void unlink_names(mc_shm_t *s) {
  if (s->unlinked)
    return;
  s->unlinked = true;
  shm_unlink(s->seg_name);
  unlink(s->wake_path);
}

void mc_shm_unlink(mc_comm_t *comm) {
  if (comm->shm)
    unlink_names(comm->shm);
}

void mc_shm_destroy(mc_comm_t *comm) {
  mc_shm_t *s = comm->shm;
  if (!s)
    return;
  unlink_names(s);
  mc_shm_leave(comm, MC_ERR_REVOKED, "it destroyed the communicator");
  for (int r = 0; r < s->n; r++) {
    if (r != s->me && s->peer[r].base)
      munmap((void *)s->peer[r].base, s->map_bytes);
    if (s->peer[r].wake_fd >= 0)
      close(s->peer[r].wake_fd);
  }
  munmap(s->self_base, s->map_bytes);
  close(s->wake_rd);
  free(s->piece);
  free(s->peer);
  free(s->srcs);
  free(s);
  comm->shm = NULL;
}

/* Copies len bytes at addr in rank r's memory to dst; false with errno set if the kernel
 * refused or the range is gone (the peer died or unmapped it). */
static bool read_peer(const mc_shm_t *s, int r, void *dst, uint64_t addr, size_t len) {
  while (len) {
    struct iovec local = {dst, len}, remote = {(void *)(uintptr_t)addr, len};
    ssize_t got = process_vm_readv(s->peer[r].hdr->pid, &local, 1, &remote, 1, 0);
    if (got <= 0) {
      if (got == 0)
        errno = EFAULT;
      return false;
    }
    dst = (char *)dst + got, addr += (uint64_t)got, len -= (size_t)got;
  }
  return true;
}

/* Can this rank read every peer's memory (same user, ptrace policy, seccomp, one pid
 * namespace)? Read each peer's random word where it says it is. Published before this rank's
 * first arrival. */
static void probe_cma(const mc_comm_t *comm, mc_shm_t *s) {
  uint32_t verdict = CMA_YES; /* MC_ALGO's shm_cma may ask for it at any size */
  for (int r = 0; r < s->n && verdict == CMA_YES; r++) {
    uint64_t word = 0;
    if (r == s->me)
      continue;
    bool read = read_peer(s, r, &word, s->peer[r].hdr->nonce_addr, sizeof word);
    if (!read || word != s->peer[r].hdr->nonce) {
      MC_LOG(MC_LOG_INFO, comm->rank,
             "communicator %s: cannot read rank %d's memory (process_vm_readv: %s): large "
             "operations copy through the shared segment",
             comm->name, s->grp[r], read ? "another process answered" : strerror(errno));
      verdict = CMA_NO;
    }
  }
  if (verdict == CMA_YES) { /* a reduction's peer data, a piece per peer, stays in cache */
    size_t per_peer = (size_t)512 * 1024 / (size_t)(s->n - 1);
    s->piece_bytes = per_peer < 65536 ? 65536 : per_peer & ~(size_t)4095;
    if (!(s->piece = aligned_alloc(64, (size_t)(s->n - 1) * s->piece_bytes)))
      verdict = CMA_NO;
  }
  atomic_store(&s->self->cma, verdict);
}

/* Maps every peer's segment. They exist: a peer creates its segment before it publishes its
 * transport address, which this rank read before it could start an operation. */
static mc_status_t attach(mc_comm_t *comm, char *err, size_t errlen) {
  mc_shm_t *s = comm->shm;
  for (int r = 0; r < s->n; r++) {
    if (r == s->me || s->peer[r].base)
      continue;
    char seg[80], wake[96];
    names(comm, s->grp[r], seg, sizeof seg, wake, sizeof wake);
    int fd = shm_open(seg, O_RDONLY | O_CLOEXEC, 0);
    void *p = MAP_FAILED;
    if (fd >= 0) {
      p = mmap(NULL, s->map_bytes, PROT_READ, MAP_SHARED, fd, 0);
      close(fd);
    }
    if (p == MAP_FAILED) {
      snprintf(err, errlen, "cannot map rank %d's segment %s: %s", s->grp[r], seg, strerror(errno));
      return MC_ERR_PEER_FAILED;
    }
    s->peer[r].base = p;
    s->peer[r].hdr = p;
    if (s->peer[r].hdr->magic != SHM_MAGIC || s->peer[r].hdr->slot_bytes != s->slot_bytes) {
      snprintf(err, errlen, "rank %d's segment %s has another layout (MC_SHM_SLOT_BYTES differs?)",
               s->grp[r], seg);
      return MC_ERR_INVALID;
    }
    /* read-write, though this rank only writes: a FIFO with no reader left (its owner died)
     * would answer a write with SIGPIPE, which kills a process that does not ignore it */
    if ((s->peer[r].wake_fd = open(wake, O_RDWR | O_NONBLOCK | O_CLOEXEC)) < 0) {
      snprintf(err, errlen, "cannot open rank %d's wake-up FIFO %s: %s", s->grp[r], wake,
               strerror(errno));
      return MC_ERR_PEER_FAILED;
    }
  }
  probe_cma(comm, s);
  s->attached = true;
  return MC_OK;
}

/* ---- which operations, how many chunks ---- */

bool mc_shm_supports(int kind) {
  switch (kind) {
  case MC_OP_ALLREDUCE:
  case MC_OP_REDUCE_SCATTER:
  case MC_OP_ALLGATHER:
  case MC_OP_BROADCAST:
  case MC_OP_BARRIER:
  case MC_OP_REDUCE:
  case MC_OP_GATHER:
  case MC_OP_SCATTER:
  case MC_OP_ALLTOALL: return true;
  default: return false;
  }
}

/* Elements per chunk: what one slot holds; for the kinds whose slot holds a piece for every
 * rank, a 1/n of that. */
static size_t chunk_elems(const mc_shm_t *s, const mc_request_t *req) {
  size_t esz = mc_dtype_size(req->dtype);
  size_t per = s->slot_bytes / esz;
  if (req->kind == MC_OP_REDUCE_SCATTER || req->kind == MC_OP_ALLTOALL ||
      req->kind == MC_OP_SCATTER)
    per /= (size_t)s->n;
  return per ? per : 1;
}

static void start(mc_shm_t *s, mc_request_t *req) {
  size_t esz = mc_dtype_size(req->dtype), per = chunk_elems(s, req);
  bool by_size =
      req->algo == MC_ALGO_SHM || req->algo == MC_ALGO_SHM_SLOTS || req->algo == MC_ALGO_SHM_CMA;
  bool two_phase =
      req->algo == MC_ALGO_SHM_TWO_PHASE || (by_size && req->count * esz > s->flat_max);
  req->shm.algo = req->kind == MC_OP_ALLREDUCE && two_phase ? ALG_TWO_PHASE : ALG_FLAT;
  /* s->cma_all (which includes equal thresholds) and the arguments are the same on every rank,
   * so is the choice; MC_ALGO rules that differ show as a mismatch (signatures_agree) */
  req->shm.cma = s->cma_all == 1 && req->kind != MC_OP_BARRIER && req->redop != MC_PREMUL_SUM &&
                 (req->algo == MC_ALGO_SHM_CMA ||
                  (req->algo == MC_ALGO_SHM && s->cma_min && req->count * esz >= s->cma_min));
  req->shm.t0 = s->next_t;
  req->shm.chunks = req->count && !req->shm.cma ? (req->count + per - 1) / per : 1;
  if (req->kind == MC_OP_BARRIER)
    req->shm.chunks = 1;
  req->shm.chunk = 0;
  req->shm.phase = PH_START;
  req->shm.started = true;
}

/* ---- flags ---- */

static size_t flag_offset(int phase) {
  return phase == PH_START || phase == PH_DRAIN ? offsetof(shm_header_t, released)
         : phase == PH_ARRIVED                  ? offsetof(shm_header_t, arrived)
                                                : offsetof(shm_header_t, reduced);
}

static uint64_t flag(const shm_header_t *h, size_t off) {
  return atomic_load((_Atomic uint64_t *)((char *)h + off));
}

/* The value every peer's flag must reach before the request's phase can run. */
static uint64_t awaited(const mc_request_t *req) {
  uint64_t t = req->shm.t0 + req->shm.chunk;
  if (req->shm.phase == PH_START)
    return t > 2 ? t - 2 : 0; /* slot[t % 2] free again */
  return t;
}

static bool peers_reached(const mc_shm_t *s, const mc_request_t *req) {
  uint64_t want = awaited(req);
  size_t off = flag_offset(req->shm.phase);
  for (int r = 0; r < s->n; r++)
    if (r != s->me && flag(s->peer[r].hdr, off) < want)
      return false;
  return true;
}

static void wake_sleepers(mc_shm_t *s) {
  for (int r = 0; r < s->n; r++)
    if (r != s->me && s->peer[r].wake_fd >= 0 &&
        atomic_load((_Atomic uint32_t *)&s->peer[r].hdr->sleeping)) {
      char one = 1;
      ssize_t w = write(s->peer[r].wake_fd, &one, 1);
      (void)w; /* a full FIFO is already a wake-up */
    }
}

static void publish(mc_shm_t *s, _Atomic uint64_t *f, uint64_t t) {
  atomic_store(f, t); /* sequentially consistent: pairs with the sleeper's flag-then-check */
  wake_sleepers(s);
}

/* The peer that left while this request still needs its chunk, or -1. */
static int abandoned_by(const mc_shm_t *s, const mc_request_t *req) {
  uint64_t t = req->shm.phase == PH_START ? awaited(req) : req->shm.t0 + req->shm.chunk;
  for (int r = 0; r < s->n; r++)
    if (r != s->me && atomic_load((_Atomic uint32_t *)&s->peer[r].hdr->revoked) &&
        flag(s->peer[r].hdr, offsetof(shm_header_t, released)) < t)
      return r;
  return -1;
}

void mc_shm_leave(mc_comm_t *comm, mc_status_t st, const char *why) {
  mc_shm_t *s = comm->shm;
  if (!s || atomic_load(&s->self->revoked))
    return;
  s->self->left_status = st == MC_ERR_TIMEOUT ? MC_ERR_REVOKED : st;
  snprintf(s->self->left_why, sizeof s->self->left_why, "%s", why);
  atomic_store(&s->self->revoked, 1); /* publishes the reason */
  if (s->attached)
    wake_sleepers(s); /* peers waiting on this rank's flags look again */
}

/* ---- the chunk phases ---- */

/* Chunk geometry of the request's current chunk, in elements. */
typedef struct {
  uint64_t t;
  size_t base, len; /* element range of the chunk within a rank's block */
} chunk_t;

static chunk_t current_chunk(const mc_shm_t *s, const mc_request_t *req) {
  size_t per = chunk_elems(s, req);
  chunk_t c = {req->shm.t0 + req->shm.chunk, req->shm.chunk * per, 0};
  c.len = req->count > c.base ? req->count - c.base : 0;
  if (c.len > per)
    c.len = per;
  return c;
}

static char *elem(const void *buf, size_t i, size_t esz) { return (char *)buf + i * esz; }

/* A copy that in-place arguments make unnecessary (the source is already the destination). */
static void copy_apart(void *dst, const void *src, size_t bytes) {
  if (dst != src && bytes)
    mc_copy(dst, src, bytes);
}

/* Two-phase slices of a chunk of len elements: slice i of n, as the ring's chunks. */
static size_t slice_count(size_t len, int n, int i) { return len / n + ((size_t)i < len % n); }
static size_t slice_offset(size_t len, int n, int i) {
  size_t base = len / n, extra = len % n;
  return (size_t)i * base + ((size_t)i < extra ? (size_t)i : extra);
}

/* PH_START: put this rank's input of the chunk into its slot, then say so. */
static void copy_in(mc_shm_t *s, mc_request_t *req, chunk_t c) {
  size_t esz = mc_dtype_size(req->dtype);
  char *slot = slot_of(s->self_base, s->slot_bytes, c.t);
  switch (req->kind) {
  case MC_OP_ALLREDUCE:
    if (req->shm.algo == ALG_FLAT) {
      mc_load_input(req, slot, elem(req->in, c.base, esz), c.len);
    } else { /* the slices the others reduce; this rank reads its own from in */
      for (int i = 0; i < s->n; i++)
        if (i != s->me || req->redop == MC_PREMUL_SUM) {
          size_t off = slice_offset(c.len, s->n, i);
          mc_load_input(req, elem(slot, off, esz), elem(req->in, c.base + off, esz),
                        slice_count(c.len, s->n, i));
        }
    }
    break;
  case MC_OP_REDUCE_SCATTER: /* block i of the chunk: rank i's part of the input */
    for (int i = 0; i < s->n; i++)
      if (i != s->me || req->redop == MC_PREMUL_SUM)
        mc_load_input(req, elem(slot, (size_t)i * c.len, esz),
                      elem(req->in, (size_t)i * req->count + c.base, esz), c.len);
    break;
  case MC_OP_ALLGATHER: mc_copy(slot, elem(req->in, c.base, esz), c.len * esz); break;
  case MC_OP_REDUCE: mc_load_input(req, slot, elem(req->in, c.base, esz), c.len); break;
  case MC_OP_GATHER:
    if (s->me != req->root)
      mc_copy(slot, elem(req->in, c.base, esz), c.len * esz);
    break;
  case MC_OP_SCATTER:
  case MC_OP_ALLTOALL: /* block i of the chunk: what rank i gets */
    for (int i = 0; i < s->n; i++)
      if (i != s->me && (req->kind == MC_OP_ALLTOALL || s->me == req->root))
        mc_copy(elem(slot, (size_t)i * c.len, esz),
                elem(req->in, (size_t)i * req->count + c.base, esz), c.len * esz);
    break;
  case MC_OP_BROADCAST:
    if (s->me == req->root)
      mc_copy(slot, elem(req->out, c.base, esz), c.len * esz);
    break;
  default: break;
  }
  s->self->sig[c.t & 1] = req->signature;
  s->self->single[c.t & 1] = 0;
  s->self->seq[c.t & 1] = req->seq;
  publish(s, &s->self->arrived, c.t);
}

/* dst = every rank's contribution (this rank's `own`, the peers' from their slots at
 * slot_elem) reduced in rank order, each input read once (mc_reduce_many). PREMUL_SUM reads
 * this rank's scaled copy from its slot. */
static void reduce_from(mc_shm_t *s, mc_request_t *req, void *dst, const void *own,
                        size_t slot_elem, size_t count, uint64_t t) {
  size_t esz = mc_dtype_size(req->dtype);
  if (req->redop == MC_PREMUL_SUM)
    own = elem(slot_of(s->self_base, s->slot_bytes, t), slot_elem, esz);
  for (int r = 0; r < s->n; r++)
    s->srcs[r] =
        r == s->me ? own : elem(slot_of((char *)s->peer[r].base, s->slot_bytes, t), slot_elem, esz);
  mc_reduce_many(dst, s->srcs, s->n, count, req->dtype, req->redop);
  if (req->redop == MC_AVG)
    mc_scale_div(dst, count, req->dtype, s->n);
}

/* The flat allreduce reduces every slot in rank order, so all ranks compute the same bits. */
static void reduce_all_slots(mc_shm_t *s, mc_request_t *req, void *dst, size_t count, uint64_t t) {
  for (int r = 0; r < s->n; r++)
    s->srcs[r] = slot_of((char *)s->peer[r].base, s->slot_bytes, t);
  mc_reduce_many(dst, s->srcs, s->n, count, req->dtype, req->redop);
  if (req->redop == MC_AVG)
    mc_scale_div(dst, count, req->dtype, s->n);
}

/* The ranks of a chunk run operations with different sequence numbers: they called different
 * operations before this one (one that ran over the transport on some ranks), so they are out
 * of step for good. Every rank of the host sees it; the communicator is revoked everywhere. */
static bool in_step(mc_shm_t *s, mc_request_t *req, uint64_t t) {
  for (int r = 0; r < s->n; r++) {
    uint32_t theirs = s->peer[r].hdr->seq[t & 1];
    if (r == s->me || theirs == req->seq)
      continue;
    mc_comm_t *comm = req->comm;
    char why[MC_ERRLEN];
    snprintf(why, sizeof why,
             "rank %d: %s #%u on %s: rank %d runs its collective #%u on the shared memory at the "
             "same time: the ranks called different operations before it",
             comm->rank, mc_op_name(req->kind), req->seq, comm->name, s->grp[r], theirs);
    mc_comm_break(comm, MC_ERR_REVOKED, why);
    mc_shm_leave(comm, MC_ERR_REVOKED, why);
    mc_request_complete(req, MC_ERR_MISMATCH, "%s", why);
    return false;
  }
  return true;
}

/* A rank whose signature carries MC_SIG_MISMATCH (a hierarchical operation whose other stages
 * found the ranks' arguments differ) makes every rank give up, itself included. */
static bool signatures_agree(mc_shm_t *s, mc_request_t *req, uint64_t t) {
  if (req->signature & MC_SIG_MISMATCH) {
    req->mismatch = true;
    snprintf(req->err, sizeof req->err, "the ranks called it with different arguments");
    return false;
  }
  for (int r = 0; r < s->n; r++) {
    uint64_t theirs = s->peer[r].hdr->sig[t & 1];
    if (r != s->me && (theirs & MC_SIG_MISMATCH)) {
      req->mismatch = true;
      snprintf(req->err, sizeof req->err,
               "rank %d reported that the ranks called this operation with different arguments",
               s->grp[r]);
      return false;
    }
    if (r != s->me && theirs == req->signature &&
        s->peer[r].hdr->single[t & 1] != (uint32_t)req->shm.cma) {
      req->mismatch = true;
      snprintf(req->err, sizeof req->err,
               "rank %d runs %s #%u %s but this rank %s (MC_ALGO or MC_SHM_CMA_MIN differ?)",
               s->grp[r], mc_op_name(req->kind), req->seq,
               req->shm.cma ? "through the shared slots" : "single copy",
               req->shm.cma ? "single copy" : "through the shared slots");
      return false;
    }
    if (r != s->me && theirs != req->signature) {
      char a[128], b[128];
      mc_describe_signature(theirs, a, sizeof a);
      mc_describe_signature(req->signature, b, sizeof b);
      req->mismatch = true;
      snprintf(req->err, sizeof req->err, "rank %d called %s but this rank called %s", s->grp[r], a,
               b);
      return false;
    }
  }
  return true;
}

/* PH_ARRIVED: every input of the chunk is in place. Returns the next phase, or PH_START when
 * the chunk is done. */
static int on_arrived(mc_shm_t *s, mc_request_t *req, chunk_t c) {
  size_t esz = mc_dtype_size(req->dtype);
  switch (req->kind) {
  case MC_OP_ALLREDUCE:
    if (req->shm.algo == ALG_FLAT) {
      reduce_all_slots(s, req, elem(req->out, c.base, esz), c.len, c.t);
    } else {
      size_t off = slice_offset(c.len, s->n, s->me), cnt = slice_count(c.len, s->n, s->me);
      char *dst = elem(req->out, c.base + off, esz);
      reduce_from(s, req, dst, elem(req->in, c.base + off, esz), off, cnt, c.t);
      mc_copy(elem(red_of(s->self_base, s->slot_bytes, c.t), off, esz), dst, cnt * esz);
      publish(s, &s->self->reduced, c.t);
      return PH_REDUCED;
    }
    break;
  case MC_OP_REDUCE_SCATTER:
    reduce_from(s, req, elem(req->out, c.base, esz),
                elem(req->in, (size_t)s->me * req->count + c.base, esz), (size_t)s->me * c.len,
                c.len, c.t);
    break;
  case MC_OP_ALLGATHER:
    for (int r = 0; r < s->n; r++) {
      char *dst = elem(req->out, (size_t)r * req->count + c.base, esz);
      const char *src = r == s->me ? elem(req->in, c.base, esz)
                                   : slot_of((char *)s->peer[r].base, s->slot_bytes, c.t);
      copy_apart(dst, src, c.len * esz);
    }
    break;
  case MC_OP_BROADCAST:
    if (s->me != req->root && c.len)
      mc_copy(elem(req->out, c.base, esz),
              slot_of((char *)s->peer[req->root].base, s->slot_bytes, c.t), c.len * esz);
    break;
  case MC_OP_REDUCE:
    if (s->me == req->root)
      reduce_all_slots(s, req, elem(req->out, c.base, esz), c.len, c.t);
    break;
  case MC_OP_GATHER:
    for (int r = 0; s->me == req->root && r < s->n; r++) {
      char *dst = elem(req->out, (size_t)r * req->count + c.base, esz);
      const char *src = r == s->me ? elem(req->in, c.base, esz)
                                   : slot_of((char *)s->peer[r].base, s->slot_bytes, c.t);
      copy_apart(dst, src, c.len * esz);
    }
    break;
  case MC_OP_SCATTER: {
    const char *src = s->me == req->root
                          ? elem(req->in, (size_t)s->me * req->count + c.base, esz)
                          : elem(slot_of((char *)s->peer[req->root].base, s->slot_bytes, c.t),
                                 (size_t)s->me * c.len, esz);
    copy_apart(elem(req->out, c.base, esz), src, c.len * esz);
    break;
  }
  case MC_OP_ALLTOALL:
    for (int r = 0; r < s->n; r++) {
      char *dst = elem(req->out, (size_t)r * req->count + c.base, esz);
      const char *src = r == s->me ? elem(req->in, (size_t)r * req->count + c.base, esz)
                                   : elem(slot_of((char *)s->peer[r].base, s->slot_bytes, c.t),
                                          (size_t)s->me * c.len, esz);
      copy_apart(dst, src, c.len * esz);
    }
    break;
  default: break;
  }
  publish(s, &s->self->released, c.t);
  return PH_START;
}

/* PH_REDUCED (two-phase allreduce): copy the slices the others reduced. */
static void on_reduced(mc_shm_t *s, mc_request_t *req, chunk_t c) {
  size_t esz = mc_dtype_size(req->dtype);
  for (int r = 0; r < s->n; r++) {
    if (r == s->me)
      continue;
    size_t off = slice_offset(c.len, s->n, r);
    mc_copy(elem(req->out, c.base + off, esz),
            elem(red_of((char *)s->peer[r].base, s->slot_bytes, c.t), off, esz),
            slice_count(c.len, s->n, r) * esz);
  }
  publish(s, &s->self->released, c.t);
}

/* ---- single copy: the peers' buffers, read with process_vm_readv ---- */

/* Fails the request and the communicator. The segment says so first: a peer may be reading
 * this rank's buffers (single copy), and must see `revoked` before the caller gets them back. */
static void fail_now(mc_request_t *req, mc_status_t st, const char *why) {
  mc_comm_revoke_local(req->comm, st, why);
  mc_shm_leave(req->comm, st, why);
  mc_request_complete(req, st, "%s", why);
}

/* The request fails because rank r left (revoked or destroyed its communicator), with the
 * reason it gave, which often arrives before this rank's own control plane learns of it. */
static void fail_left(mc_shm_t *s, mc_request_t *req, int r) {
  const shm_header_t *h = s->peer[r].hdr;
  mc_status_t st = h->left_status == MC_ERR_PEER_FAILED ? MC_ERR_PEER_FAILED : MC_ERR_REVOKED;
  char why[MC_ERRLEN];
  snprintf(why, sizeof why, "rank %d: %s #%u on %s failed: revoked by rank %d: %.255s",
           req->comm->rank, mc_op_name(req->kind), req->seq, req->comm->name, s->grp[r],
           h->left_why);
  fail_now(req, st, why);
}

static bool peer_left(const mc_shm_t *s, int r) {
  return atomic_load((_Atomic uint32_t *)&s->peer[r].hdr->revoked) != 0;
}

/* Rank r's buffer could not be read (errno says why): it left, or died. */
static void fail_read(mc_shm_t *s, mc_request_t *req, int r) {
  int err = errno;
  if (peer_left(s, r)) {
    fail_left(s, req, r);
    return;
  }
  char why[MC_ERRLEN];
  snprintf(why, sizeof why,
           "rank %d: %s #%u on %s failed: cannot read rank %d's buffer (process_vm_readv: %s)",
           req->comm->rank, mc_op_name(req->kind), req->seq, req->comm->name, s->grp[r],
           strerror(err));
  fail_now(req, err == ESRCH ? MC_ERR_PEER_FAILED : MC_ERR_TRANSPORT, why); /* gone/refused */
}

/* After reading: a peer that left may have reused its buffers while they were read (it
 * publishes `revoked` before it fails its operations), so the data cannot be trusted. */
static bool reads_trusted(mc_shm_t *s, mc_request_t *req) {
  for (int r = 0; r < s->n; r++)
    if (r != s->me && peer_left(s, r)) {
      fail_left(s, req, r);
      return false;
    }
  return true;
}

static void cma_arrive(mc_shm_t *s, mc_request_t *req, uint64_t t) {
  s->self->buf_in[t & 1] = (uintptr_t)req->in;
  s->self->buf_out[t & 1] = (uintptr_t)req->out;
  s->self->sig[t & 1] = req->signature;
  s->self->single[t & 1] = 1;
  s->self->seq[t & 1] = req->seq;
  publish(s, &s->self->arrived, t);
}

static uint64_t peer_in(const mc_shm_t *s, int r, uint64_t t) {
  return s->peer[r].hdr->buf_in[t & 1];
}
static uint64_t peer_out(const mc_shm_t *s, int r, uint64_t t) {
  return s->peer[r].hdr->buf_out[t & 1];
}

/* dst = the rank-order reduction of count elements: this rank's from own, each peer's from its
 * input buffer at byte offset off, read a piece at a time into local memory. Returns the peer
 * that could not be read, or -1. */
static int reduce_peers(mc_shm_t *s, mc_request_t *req, char *dst, const char *own, size_t off,
                        size_t count) {
  size_t esz = mc_dtype_size(req->dtype), per = s->piece_bytes / esz;
  uint64_t t = req->shm.t0;
  for (size_t done = 0; done < count; done += per) {
    size_t k = count - done < per ? count - done : per;
    for (int r = 0, i = 0; r < s->n; r++) {
      if (r == s->me) {
        s->srcs[r] = own + done * esz;
        continue;
      }
      char *piece = s->piece + (size_t)i++ * s->piece_bytes;
      if (!read_peer(s, r, piece, peer_in(s, r, t) + off + done * esz, k * esz))
        return r;
      s->srcs[r] = piece;
    }
    mc_reduce_many(dst + done * esz, s->srcs, s->n, k, req->dtype, req->redop);
    if (req->redop == MC_AVG)
      mc_scale_div(dst + done * esz, k, req->dtype, s->n);
  }
  return -1;
}

/* PH_ARRIVED with every peer's buffer addresses published: read (and reduce) this rank's
 * part. Returns the next phase, or -1 if the request failed. */
static int cma_on_arrived(mc_shm_t *s, mc_request_t *req) {
  size_t esz = mc_dtype_size(req->dtype), blk = req->count * esz;
  uint64_t t = req->shm.t0;
  int me = s->me, root = req->root, bad = -1;
  char *out = req->out;
  const char *in = req->in;
  switch (req->kind) {
  case MC_OP_ALLREDUCE: { /* reduce-scatter: this rank's slice of everyone's input */
    size_t off = slice_offset(req->count, s->n, me) * esz;
    bad = reduce_peers(s, req, out + off, in + off, off, slice_count(req->count, s->n, me));
    break;
  }
  case MC_OP_REDUCE_SCATTER:
    bad = reduce_peers(s, req, out, in + (size_t)me * blk, (size_t)me * blk, req->count);
    break;
  case MC_OP_REDUCE:
    if (me == root)
      bad = reduce_peers(s, req, out, in, 0, req->count);
    break;
  case MC_OP_ALLGATHER:
  case MC_OP_GATHER:
    for (int r = 0; r < s->n && bad < 0 && (req->kind == MC_OP_ALLGATHER || me == root); r++)
      if (r == me)
        copy_apart(out + (size_t)r * blk, in, blk);
      else if (!read_peer(s, r, out + (size_t)r * blk, peer_in(s, r, t), blk))
        bad = r;
    break;
  case MC_OP_BROADCAST: /* the root's data is in its out */
    if (me != root && !read_peer(s, root, out, peer_out(s, root, t), blk))
      bad = root;
    break;
  case MC_OP_SCATTER:
    if (me == root)
      copy_apart(out, in + (size_t)me * blk, blk);
    else if (!read_peer(s, root, out, peer_in(s, root, t) + (size_t)me * blk, blk))
      bad = root;
    break;
  case MC_OP_ALLTOALL:
    for (int r = 0; r < s->n && bad < 0; r++)
      if (r == me)
        copy_apart(out + (size_t)r * blk, in + (size_t)r * blk, blk);
      else if (!read_peer(s, r, out + (size_t)r * blk, peer_in(s, r, t) + (size_t)me * blk, blk))
        bad = r;
    break;
  default: break;
  }
  if (bad >= 0) {
    fail_read(s, req, bad);
    return -1;
  }
  if (!reads_trusted(s, req))
    return -1;
  if (req->kind == MC_OP_ALLREDUCE) {
    publish(s, &s->self->reduced, t);
    return PH_REDUCED;
  }
  publish(s, &s->self->released, t);
  return PH_DRAIN;
}

/* PH_REDUCED (allreduce): allgather, each peer's reduced slice from its out. */
static int cma_on_reduced(mc_shm_t *s, mc_request_t *req) {
  size_t esz = mc_dtype_size(req->dtype);
  uint64_t t = req->shm.t0;
  for (int r = 0; r < s->n; r++) {
    size_t off = slice_offset(req->count, s->n, r) * esz;
    if (r != s->me && !read_peer(s, r, (char *)req->out + off, peer_out(s, r, t) + off,
                                 slice_count(req->count, s->n, r) * esz)) {
      fail_read(s, req, r);
      return -1;
    }
  }
  if (!reads_trusted(s, req))
    return -1;
  publish(s, &s->self->released, t);
  return PH_DRAIN;
}

static void finish(mc_shm_t *s, mc_request_t *req, uint64_t chunks_used) {
  s->next_t = req->shm.t0 + chunks_used;
  mc_sched_finish(req);
}

/* MC_FAULT injection point before each phase (fault.h): the phase number counts the phases
 * of the operation, 3 per chunk through the slots (start, arrived, reduced); a single-copy
 * operation is one chunk of 4 (3: the drain). "error" breaks the communicator as a failed
 * link would. */
static bool fault_here(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  char phase[24];
  snprintf(phase, sizeof phase, "%zu", req->shm.chunk * 3 + (size_t)req->shm.phase);
  if (!mc_fault_point(comm->members[comm->rank], mc_op_name(req->kind), req->seq, phase))
    return false;
  mc_comm_break(comm, MC_ERR_TRANSPORT, "injected transport error (MC_FAULT)");
  mc_shm_leave(comm, MC_ERR_TRANSPORT, "injected transport error (MC_FAULT)");
  mc_request_complete(req, MC_ERR_TRANSPORT, "rank %d: %s #%u on %s: injected error (MC_FAULT)",
                      comm->rank, mc_op_name(req->kind), req->seq, comm->name);
  return true;
}

/* Runs the request as far as the flags allow; true if it moved. */
static bool advance(mc_shm_t *s, mc_request_t *req) {
  bool moved = false;
  while (!atomic_load(&req->done)) {
    chunk_t c = current_chunk(s, req);
    int gone = abandoned_by(s, req);
    if (gone >= 0) {
      fail_left(s, req, gone);
      return true;
    }
    if (!peers_reached(s, req))
      return moved;
    moved = true;
    if (fault_here(req))
      return true;
    switch (req->shm.phase) {
    case PH_START:
      if (req->shm.cma)
        cma_arrive(s, req, c.t);
      else
        copy_in(s, req, c);
      req->shm.phase = PH_ARRIVED;
      break;
    case PH_ARRIVED:
      if (!s->unlinked)
        unlink_names(s);    /* every peer has attached: no name needs to outlive a crash */
      if (s->cma_all < 0) { /* every rank probed before its first arrival */
        s->cma_all = 1;
        for (int r = 0; r < s->n; r++)
          if (atomic_load((_Atomic uint32_t *)&s->peer[r].hdr->cma) != CMA_YES ||
              s->peer[r].hdr->cma_min != s->cma_min)
            s->cma_all = 0;
      }
      if (req->shm.chunk == 0 && !in_step(s, req, c.t))
        return true;
      if (req->shm.chunk == 0 && !signatures_agree(s, req, c.t)) {
        /* every rank sees a difference; each gives up after this chunk, flags consistent */
        publish(s, &s->self->reduced, c.t);
        publish(s, &s->self->released, c.t);
        finish(s, req, 1);
        return true;
      }
      req->shm.phase = req->shm.cma ? cma_on_arrived(s, req) : on_arrived(s, req, c);
      if (req->shm.phase < 0)
        return true;
      break;
    case PH_REDUCED:
      if (req->shm.cma) {
        if ((req->shm.phase = cma_on_reduced(s, req)) < 0)
          return true;
      } else {
        on_reduced(s, req, c);
        req->shm.phase = PH_START;
      }
      break;
    case PH_DRAIN: /* every peer is done with this rank's buffers */
      req->shm.phase = PH_START;
      break;
    }
    if (req->shm.phase == PH_START && ++req->shm.chunk == req->shm.chunks)
      finish(s, req, req->shm.chunks);
  }
  return moved;
}

/* The oldest shm request not yet done: shm operations run one at a time, in order. A
 * hierarchical operation keeps its place through all its stages (coll/hier.c). */
static mc_request_t *current(mc_comm_t *comm) {
  for (mc_request_t *req = comm->active_head; req; req = req->next)
    if (req->on_shm && !atomic_load(&req->done))
      return req;
  return NULL;
}

/* The request whose flags the current operation waits for: itself, or the shm stage of a
 * hierarchical one (none while that waits for its leaders' stage). */
static mc_request_t *waiting(mc_comm_t *comm) {
  mc_request_t *req = current(comm);
  if (req && req->algo == MC_ALGO_HIER)
    req = req->hier.shm && !atomic_load(&req->hier.shm->done) ? req->hier.shm : NULL;
  return req;
}

bool mc_shm_run(mc_comm_t *comm, mc_request_t *req) {
  if (!req->shm.started)
    start(comm->shm, req);
  return advance(comm->shm, req);
}

static bool run_current(mc_comm_t *comm, mc_request_t *req) {
  return req->algo == MC_ALGO_HIER ? mc_hier_advance(req) : mc_shm_run(comm, req);
}

bool mc_shm_progress(mc_comm_t *comm) {
  mc_shm_t *s = comm->shm;
  mc_request_t *req = s ? current(comm) : NULL;
  if (!req)
    return false;
  if (!s->attached) {
    char err[MC_ERRLEN - 96];
    mc_status_t st = attach(comm, err, sizeof err);
    if (st != MC_OK) {
      char why[MC_ERRLEN];
      snprintf(why, sizeof why, "rank %d: %s #%u on %s: shared memory: %s", comm->rank,
               mc_op_name(req->kind), req->seq, comm->name, err);
      mc_comm_break(comm, st, why);
      mc_request_complete(req, st, "%s", why);
      return true;
    }
  }
  bool moved = run_current(comm, req);
  while (atomic_load(&req->done) && (req = current(comm))) /* the next one may be ready too */
    moved |= run_current(comm, req);
  return moved;
}

bool mc_shm_prepare_sleep(mc_comm_t *comm, int *fd) {
  mc_shm_t *s = comm->shm;
  mc_request_t *req = s && s->attached ? waiting(comm) : NULL;
  *fd = -1;
  if (!req || !req->shm.started)
    return true;
  atomic_store(&s->self->sleeping, 1);
  if (peers_reached(s, req) || abandoned_by(s, req) >= 0) {
    atomic_store(&s->self->sleeping, 0);
    return false;
  }
  *fd = s->wake_rd;
  return true;
}

void mc_shm_after_sleep(mc_comm_t *comm) {
  mc_shm_t *s = comm->shm;
  if (!s)
    return;
  atomic_store(&s->self->sleeping, 0);
  char buf[64];
  while (read(s->wake_rd, buf, sizeof buf) > 0)
    ;
}

void mc_shm_wake_self(mc_comm_t *comm) {
  char one = 1;
  if (comm->shm && write(comm->shm->wake_rd, &one, 1) < 0) {
    /* full: already a wake-up */
  }
}

void mc_shm_waiting_for(const mc_request_t *req, char *out, size_t len) {
  const mc_shm_t *s = req->comm->shm;
  size_t used = snprintf(out, len, "shared-memory flags of rank");
  if (!s || !req->shm.started || !s->attached) {
    snprintf(out, len, "shared-memory operations queued before it");
    return;
  }
  uint64_t want = awaited(req);
  size_t off = flag_offset(req->shm.phase);
  int listed = 0;
  for (int r = 0; r < s->n && used + 8 < len; r++)
    if (r != s->me && flag(s->peer[r].hdr, off) < want)
      used += snprintf(out + used, len - used, "%s %d", listed++ ? "," : "", s->grp[r]);
}
