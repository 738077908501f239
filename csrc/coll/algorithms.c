/* Collective algorithms, written as step generators for the scheduler (schedule.c):
 * mc_algo_next_step() fills the transfers of step req->step and returns false when done.
 *   allreduce  recursive doubling (small) or ring reduce-scatter + allgather (large)
 *   reduce_scatter  ring
 *   allgather  ring
 *   broadcast  binomial tree
 *   reduce     binomial tree (small) or ring reduce-scatter + gather to the root (large)
 *   gather, scatter  binomial tree
 *   alltoall(v)  pairwise exchange, up to ALLTOALL_BATCH peers per step
 *   barrier    dissemination */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "reduce.h"

/* The root of a gather receives up to this many chunks in one step (MC_MAX_XFERS bounds a
 * step), and an all-to-all exchanges with this many peers per step. */
#define GATHER_BATCH 32
#define ALLTOALL_BATCH 16

static int mod(int a, int n) { return ((a % n) + n) % n; }

/* Ring chunk i of count elements split n ways: the first count % n chunks get one more. */
static size_t chunk_count(size_t count, int n, int i) {
  return count / n + ((size_t)i < count % n);
}
static size_t chunk_offset(size_t count, int n, int i) {
  size_t base = count / n, extra = count % n;
  return (size_t)i * base + ((size_t)i < extra ? (size_t)i : extra);
}

static char *at(void *buf, size_t elems, mc_dtype_t t) {
  return (char *)buf + elems * mc_dtype_size(t);
}

static bool no_memory(mc_request_t *req, size_t bytes) {
  mc_request_complete(req, MC_ERR_NOMEM, "rank %d: %s #%u: no memory for %zu bytes",
                      req->comm->rank, mc_op_name(req->kind), req->seq, bytes);
  return false;
}

/* Scratch space of `bytes` in req->tmp (freed with the request); false if that failed. */
static bool scratch(mc_request_t *req, size_t bytes) {
  if (bytes && !(req->tmp = malloc(bytes)))
    return no_memory(req, bytes);
  return true;
}

/* Rank r's position in a tree rooted at `root`, and the number of ranks in its subtree:
 * virtual rank v heads [v, v + lowest set bit of v), clipped to n (the root heads them all). */
static int vrank(const mc_request_t *req) { return mod(req->grp_me - req->root, req->grp_n); }
static int subtree(int v, int n) {
  int low = v & -v;
  return v == 0 || low > n - v ? n - v : low;
}

void mc_load_input(const mc_request_t *req, void *dst, const void *in, size_t count) {
  if (req->redop == MC_PREMUL_SUM && (req->kind == MC_OP_ALLREDUCE || req->kind == MC_OP_REDUCE ||
                                      req->kind == MC_OP_REDUCE_SCATTER))
    mc_premul(dst, in, count, req->dtype, req->factor);
  else if (dst != in && count)
    mc_copy(dst, in, count * mc_dtype_size(req->dtype));
}

static void setup_reduce(mc_request_t *req, size_t bytes, size_t esz) {
  const int n = req->grp_n;
  const bool root = req->grp_me == req->root;
  if (n == 1) {
    mc_load_input(req, req->out, req->in, req->count);
    return;
  }
  /* The root reduces into out; the others into scratch after the receive space. */
  size_t recv_bytes = bytes;
  if (req->algo == MC_ALGO_RING)
    recv_bytes = chunk_count(req->count, n, 0) * esz;
  if (!scratch(req, recv_bytes + (root ? 0 : bytes)))
    return;
  if (!root)
    req->out = (char *)req->tmp + recv_bytes;
  mc_load_input(req, req->out, req->in, req->count);
}

/* Gather and scatter keep the blocks of a subtree in virtual-rank order: the root uses out (in)
 * directly when it is rank 0, and a rotated copy in scratch otherwise; an inner rank of the
 * tree uses scratch for its subtree; a leaf uses its own block in place. */
static void setup_tree(mc_request_t *req, size_t bytes) {
  const int n = req->grp_n, v = vrank(req), sub = subtree(v, n);
  const bool gather = req->kind == MC_OP_GATHER;
  char *mine =
      v == 0 ? at(gather ? req->out : (void *)req->in, req->count * req->root, req->dtype) : NULL;
  if (v == 0 && mine != (gather ? req->in : req->out) && bytes) /* the root's own block */
    memcpy(gather ? mine : req->out, gather ? req->in : mine, bytes);
  if (n == 1 || sub == 1 || (v == 0 && req->root == 0))
    return;
  if (!scratch(req, bytes * sub))
    return;
  if (gather) /* own block first */
    memcpy(req->tmp, req->in, bytes);
  if (!gather && v == 0) { /* rotate: virtual block k is rank (k + root) % n's */
    size_t head = bytes * (n - req->root);
    memcpy(req->tmp, at((void *)req->in, req->count * req->root, req->dtype), head);
    memcpy((char *)req->tmp + head, req->in, bytes * req->root);
  }
}

void mc_algo_setup(mc_request_t *req) {
  mc_comm_t *comm = req->comm;
  const int n = req->grp_n;
  const size_t esz = mc_dtype_size(req->dtype), bytes = req->count * esz;
  switch (req->kind) {
  case MC_OP_ALLREDUCE: {
    mc_load_input(req, req->out, req->in, req->count);
    if (n == 1)
      break;
    size_t tmp_bytes = bytes;
    if (req->algo == MC_ALGO_RING)
      tmp_bytes = chunk_count(req->count, n, 0) * esz;
    if (tmp_bytes && !(req->tmp = malloc(tmp_bytes))) {
      mc_request_complete(req, MC_ERR_NOMEM, "rank %d: allreduce #%u: no memory for %zu bytes",
                          comm->rank, req->seq, tmp_bytes);
    }
    break;
  }
  case MC_OP_REDUCE_SCATTER: {
    if (n == 1) {
      mc_load_input(req, req->out, req->in, req->count);
      break;
    }
    /* PREMUL_SUM: the ring reads every input block, so it reads a scaled copy */
    size_t in_bytes = req->redop == MC_PREMUL_SUM ? bytes * n : 0;
    if (!scratch(req, bytes + in_bytes))
      break;
    if (in_bytes) {
      mc_load_input(req, (char *)req->tmp + bytes, req->in, req->count * n);
      req->in = (char *)req->tmp + bytes;
    }
    break;
  }
  case MC_OP_REDUCE: setup_reduce(req, bytes, esz); break;
  case MC_OP_GATHER:
  case MC_OP_SCATTER: setup_tree(req, bytes); break;
  case MC_OP_ALLTOALL:
    if (bytes)
      memcpy(at(req->out, req->count * req->grp_me, req->dtype),
             at((void *)req->in, req->count * req->grp_me, req->dtype), bytes);
    break;
  case MC_OP_ALLTOALLV: {
    /* vcounts: send counts, send displs, recv counts, recv displs */
    const size_t *v = req->vcounts, me = (size_t)req->grp_me;
    if (v[me] != v[2 * n + me]) {
      req->mismatch = true; /* peers learn it from the mismatch bit */
      snprintf(req->err, sizeof req->err, "it sends %zu elements to itself but receives %zu", v[me],
               v[2 * n + me]);
    } else if (v[me]) {
      memcpy(at(req->out, v[3 * n + me], req->dtype), at((void *)req->in, v[n + me], req->dtype),
             v[me] * esz);
    }
    break;
  }
  case MC_OP_ALLGATHER: {
    char *mine = at(req->out, req->count * req->grp_me, req->dtype);
    if (req->in != mine && bytes)
      memcpy(mine, req->in, bytes);
    break;
  }
  default: break;
  }
}

/* divided by the communicator's size, also in a hierarchical operation's leaders' stage */
static void finish_avg(mc_request_t *req, void *buf, size_t count) {
  if (req->redop == MC_AVG)
    mc_scale_div(buf, count, req->dtype, req->comm->size);
}

/* Recursive doubling; a non-power-of-two size first folds the extra ranks into their
 * neighbours and unfolds them at the end. */
static bool allreduce_rd(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me;
  int p = 1, levels = 0;
  while (p * 2 <= n)
    p *= 2, levels++;
  const int extra = n - p;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  const int s = req->step;
  const bool folded_out = r < 2 * extra && r % 2 == 0; /* sits out the doubling */
  if (s == 0) {
    if (r < 2 * extra) {
      if (folded_out) {
        mc_step_add(req, true, r + 1, req->out, bytes);
      } else {
        mc_step_add(req, false, r - 1, req->tmp, bytes);
        req->red_dst = req->out, req->red_src = req->tmp, req->red_count = req->count;
      }
    }
    return true;
  }
  if (s <= levels) {
    if (folded_out)
      return true;
    int vr = r < 2 * extra ? r / 2 : r - extra;
    int vpartner = vr ^ (1 << (s - 1));
    int partner = vpartner < extra ? vpartner * 2 + 1 : vpartner + extra;
    mc_step_add(req, true, partner, req->out, bytes);
    mc_step_add(req, false, partner, req->tmp, bytes);
    req->red_dst = req->out, req->red_src = req->tmp, req->red_count = req->count;
    return true;
  }
  if (s == levels + 1) {
    if (r < 2 * extra) {
      if (folded_out)
        mc_step_add(req, false, r + 1, req->out, bytes);
      else
        mc_step_add(req, true, r - 1, req->out, bytes);
    }
    return true;
  }
  finish_avg(req, req->out, req->count);
  return false;
}

/* Ring: n-1 reduce-scatter steps, then n-1 allgather steps. Rank r ends the first phase
 * owning chunk r+1, which it averages before passing it on. */
static bool allreduce_ring(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, s = req->step;
  const int right = mod(r + 1, n), left = mod(r - 1, n);
  const size_t esz = mc_dtype_size(req->dtype), count = req->count;
  if (s >= 2 * n - 2)
    return false;
  if (s == n - 1) {
    int own = mod(r + 1, n);
    finish_avg(req, at(req->out, chunk_offset(count, n, own), req->dtype),
               chunk_count(count, n, own));
  }
  if (s < n - 1) {
    int send = mod(r - s, n), recv = mod(r - s - 1, n);
    mc_step_add(req, true, right, at(req->out, chunk_offset(count, n, send), req->dtype),
                chunk_count(count, n, send) * esz);
    mc_step_add(req, false, left, req->tmp, chunk_count(count, n, recv) * esz);
    req->red_dst = at(req->out, chunk_offset(count, n, recv), req->dtype);
    req->red_src = req->tmp;
    req->red_count = chunk_count(count, n, recv);
  } else {
    int k = s - (n - 1), send = mod(r + 1 - k, n), recv = mod(r - k, n);
    mc_step_add(req, true, right, at(req->out, chunk_offset(count, n, send), req->dtype),
                chunk_count(count, n, send) * esz);
    mc_step_add(req, false, left, at(req->out, chunk_offset(count, n, recv), req->dtype),
                chunk_count(count, n, recv) * esz);
  }
  return true;
}

/* Ring reduce-scatter: at step k rank r passes on its partial of block r-k-1 and receives
 * the partial of block r-k-2, which it adds to its own input block in `out`. After n-1 steps
 * `out` holds block r reduced over all ranks. Each rank sends (n-1) blocks in all. */
static bool reduce_scatter_ring(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, s = req->step;
  const size_t count = req->count, bytes = count * mc_dtype_size(req->dtype);
  if (s >= n - 1) {
    finish_avg(req, req->out, count);
    return false;
  }
  int send = mod(r - s - 1, n), recv = mod(r - s - 2, n);
  const void *src = s == 0 ? at((void *)req->in, count * send, req->dtype) : req->out;
  mc_step_add(req, true, mod(r + 1, n), (void *)src, bytes);
  mc_step_add(req, false, mod(r - 1, n), req->tmp, bytes);
  req->red_base = at((void *)req->in, count * recv, req->dtype);
  req->red_dst = req->out, req->red_src = req->tmp, req->red_count = count;
  return true;
}

/* Binomial reduce: at step k a rank whose virtual rank has bit k as its lowest set bit sends
 * its partial result to its parent and is done; the others receive their child's partial
 * (if that child exists) and reduce it into theirs. Reduces in log2(n) steps. */
static bool reduce_binomial(mc_request_t *req) {
  const int n = req->grp_n, v = vrank(req), s = req->step;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  if (s >= 31 || (1 << s) >= n) {
    if (v == 0)
      finish_avg(req, req->out, req->count);
    return false;
  }
  const int mask = 1 << s;
  if (v & (mask - 1))
    return false; /* sent to the parent in an earlier step */
  if (v & mask) {
    mc_step_add(req, true, mod(v - mask + req->root, n), req->out, bytes);
  } else if (v + mask < n) {
    mc_step_add(req, false, mod(v + mask + req->root, n), req->tmp, bytes);
    req->red_dst = req->out, req->red_src = req->tmp, req->red_count = req->count;
  }
  return true;
}

/* Large reduce: the ring reduce-scatter of allreduce_ring (n-1 steps, after which rank r owns
 * chunk r+1), then every rank sends its chunk straight to the root, which receives them in
 * place in batches. Each rank sends about 2 (n-1)/n of the data instead of log2(n) times it. */
static bool reduce_ring(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, s = req->step, root = req->root;
  const size_t esz = mc_dtype_size(req->dtype), count = req->count;
  if (s < n - 1)
    return allreduce_ring(req);
  if (s == n - 1) {
    int own = mod(r + 1, n);
    finish_avg(req, at(req->out, chunk_offset(count, n, own), req->dtype),
               chunk_count(count, n, own));
    if (r != root) {
      mc_step_add(req, true, root, at(req->out, chunk_offset(count, n, own), req->dtype),
                  chunk_count(count, n, own) * esz);
      return true;
    }
  } else if (r != root) {
    return false;
  }
  /* root: batch b of the other ranks, all tagged as step n-1 like their sends */
  int first = (s - (n - 1)) * GATHER_BATCH;
  if (first >= n - 1)
    return false;
  for (int i = first; i < first + GATHER_BATCH && i < n - 1; i++) {
    int peer = mod(root + 1 + i, n), chunk = mod(peer + 1, n);
    mc_step_add(req, false, peer, at(req->out, chunk_offset(count, n, chunk), req->dtype),
                chunk_count(count, n, chunk) * esz);
    req->xfers[req->nxfers - 1].wire_step = n - 1;
  }
  return true;
}

/* The buffer holding a rank's subtree in virtual order (see setup_tree). */
static char *tree_buf(const mc_request_t *req) {
  const bool gather = req->kind == MC_OP_GATHER;
  if (req->tmp)
    return req->tmp;
  if (vrank(req) == 0)
    return gather ? req->out : (char *)req->in;
  return gather ? (char *)req->in : req->out;
}

/* Binomial gather, the reduce tree without the reduction: at step k a rank receives its
 * child's subtree next to its own, or sends its whole subtree to its parent. The root's link
 * carries the same n-1 blocks as a linear gather, but in log2(n) messages. */
static bool gather_binomial(mc_request_t *req) {
  const int n = req->grp_n, v = vrank(req), s = req->step;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  char *buf = tree_buf(req);
  if (s >= 31 || (1 << s) >= n) {
    if (v == 0 && req->tmp) { /* rotate virtual block k to rank (k + root) % n */
      size_t head = bytes * (n - req->root);
      memcpy(at(req->out, req->count * req->root, req->dtype), buf, head);
      memcpy(req->out, buf + head, bytes * req->root);
    }
    return false;
  }
  const int mask = 1 << s;
  if (v & (mask - 1))
    return false;
  if (v & mask)
    mc_step_add(req, true, mod(v - mask + req->root, n), buf, bytes * subtree(v, n));
  else if (v + mask < n)
    mc_step_add(req, false, mod(v + mask + req->root, n), buf + bytes * mask,
                bytes * subtree(v + mask, n));
  return true;
}

/* Binomial scatter: step 0 receives the rank's subtree from its parent, step 1 sends each
 * child its part, all at once. Every link carries one message, tagged as step 0 at both ends. */
static bool scatter_binomial(mc_request_t *req) {
  const int n = req->grp_n, v = vrank(req);
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  char *buf = tree_buf(req);
  int low = 1;
  while (low < n && !(v & low))
    low <<= 1; /* lowest set bit = link to the parent */
  if (req->step == 0) {
    if (v)
      mc_step_add(req, false, mod(v - low + req->root, n), buf, bytes * subtree(v, n));
    return true;
  }
  if (req->step == 1) {
    for (int mask = low >> 1; mask > 0; mask >>= 1)
      if (v + mask < n)
        mc_step_add(req, true, mod(v + mask + req->root, n), buf + bytes * mask,
                    bytes * subtree(v + mask, n));
    for (int i = 0; i < req->nxfers; i++)
      req->xfers[i].wire_step = 0;
    return true;
  }
  if (v && req->tmp && bytes) /* an inner rank keeps the first block of its subtree */
    memcpy(req->out, buf, bytes);
  return false;
}

/* Pairwise exchange: at distance d rank r sends to r+d and receives from r-d, so every pair
 * meets exactly once. Step k covers distances [1 + k*B, (k+1)*B] so that small exchanges are
 * not serialised one peer at a time; the step number is the same at both ends. */
static bool alltoall_pairwise(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, first = 1 + req->step * ALLTOALL_BATCH;
  const size_t esz = mc_dtype_size(req->dtype);
  if (first >= n)
    return false;
  const size_t *v = req->vcounts; /* alltoallv only */
  for (int d = first; d < first + ALLTOALL_BATCH && d < n; d++) {
    int to = mod(r + d, n), from = mod(r - d, n);
    if (v) {
      mc_step_add(req, true, to, at((void *)req->in, v[n + to], req->dtype), v[to] * esz);
      mc_step_add(req, false, from, at(req->out, v[3 * n + from], req->dtype),
                  v[2 * n + from] * esz);
    } else {
      mc_step_add(req, true, to, at((void *)req->in, req->count * to, req->dtype),
                  req->count * esz);
      mc_step_add(req, false, from, at(req->out, req->count * from, req->dtype), req->count * esz);
    }
  }
  return true;
}

static bool allgather_ring(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, s = req->step;
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  if (s >= n - 1)
    return false;
  int send = mod(r - s, n), recv = mod(r - s - 1, n);
  mc_step_add(req, true, mod(r + 1, n), at(req->out, req->count * send, req->dtype), bytes);
  mc_step_add(req, false, mod(r - 1, n), at(req->out, req->count * recv, req->dtype), bytes);
  return true;
}

/* Binomial tree rooted at root: step 0 receives from the parent, step 1 sends to all
 * children at once. Each link carries one message, tagged as step 0 at both ends. */
static bool broadcast_binomial(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me;
  const int vr = mod(r - req->root, n);
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  int mask = 1;
  while (mask < n && !(vr & mask))
    mask <<= 1; /* lowest set bit = link to the parent */
  if (req->step == 0) {
    if (vr)
      mc_step_add(req, false, mod(vr - mask + req->root, n), req->out, bytes);
    return true;
  }
  if (req->step == 1) {
    for (mask >>= 1; mask > 0; mask >>= 1)
      if (vr + mask < n)
        mc_step_add(req, true, mod(vr + mask + req->root, n), req->out, bytes);
    for (int i = 0; i < req->nxfers; i++)
      req->xfers[i].wire_step = 0;
    return true;
  }
  return false;
}

static bool barrier_dissemination(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me;
  if (req->step >= 31 || (1 << req->step) >= n)
    return false;
  int dist = 1 << req->step;
  mc_step_add(req, true, mod(r + dist, n), NULL, 0);
  mc_step_add(req, false, mod(r - dist, n), NULL, 0);
  return true;
}

/* Step k greets lower ranks (and hears from higher ones) in [32k, 32k + 32). Each pair
 * exchanges one message, tagged as step 0 at both ends. */
static bool connect_lower_first(mc_request_t *req) {
  const int n = req->grp_n, r = req->grp_me, first = req->step * 32;
  if (first >= n)
    return false;
  for (int peer = first; peer < first + 32 && peer < n; peer++)
    if (peer != r)
      mc_step_add(req, peer < r, peer, NULL, 0);
  for (int i = 0; i < req->nxfers; i++)
    req->xfers[i].wire_step = 0;
  return true;
}

bool mc_algo_next_step(mc_request_t *req) {
  const size_t bytes = req->count * mc_dtype_size(req->dtype);
  switch (req->kind) {
  case MC_OP_ALLREDUCE:
    if (req->algo == MC_ALGO_TRIVIAL)
      return false;
    return req->algo == MC_ALGO_RING ? allreduce_ring(req) : allreduce_rd(req);
  case MC_OP_ALLGATHER: return req->algo != MC_ALGO_TRIVIAL && allgather_ring(req);
  case MC_OP_REDUCE_SCATTER: return req->algo != MC_ALGO_TRIVIAL && reduce_scatter_ring(req);
  case MC_OP_BROADCAST: return req->algo != MC_ALGO_TRIVIAL && broadcast_binomial(req);
  case MC_OP_REDUCE:
    if (req->algo == MC_ALGO_TRIVIAL)
      return false;
    return req->algo == MC_ALGO_RING ? reduce_ring(req) : reduce_binomial(req);
  case MC_OP_GATHER: return req->algo != MC_ALGO_TRIVIAL && gather_binomial(req);
  case MC_OP_SCATTER: return req->algo != MC_ALGO_TRIVIAL && scatter_binomial(req);
  case MC_OP_ALLTOALL:
  case MC_OP_ALLTOALLV: return req->algo != MC_ALGO_TRIVIAL && alltoall_pairwise(req);
  case MC_OP_BARRIER: return req->algo != MC_ALGO_TRIVIAL && barrier_dissemination(req);
  case MC_OP_CONNECT: return connect_lower_first(req);
  case MC_OP_SEND:
    if (req->step)
      return false;
    mc_step_add(req, true, req->peer, (void *)req->in, bytes);
    return true;
  case MC_OP_RECV:
    if (req->step)
      return false;
    mc_step_add(req, false, req->peer, req->out, bytes);
    return true;
  }
  return false;
}
