#define _GNU_SOURCE
#include "harness.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define STORE_KEYS 4096
#define STORE_VAL 512

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t changed;
  int nkeys;
  struct {
    char key[96];
    size_t len;
    char val[STORE_VAL];
  } entry[STORE_KEYS];
  int expected_death[256];
  char scratch[65536];
} shared_store_t;

typedef struct {
  shared_store_t *shared;
  char prefix[32];
} store_ctx_t;

static shared_store_t *shared;
static store_ctx_t default_ctx;
static void (*on_fork)(int rank, void *arg);
static void *on_fork_arg;

void mc_harness_on_fork(void (*fn)(int rank, void *arg), void *arg) {
  on_fork = fn;
  on_fork_arg = arg;
}

static char netns_prefix[200];
static int netns_count;

static void enter_netns(int rank, int size) {
  /* MC_TEST_NETNS_LAYOUT=block: ranks numbered host by host (torchrun's layout) */
  const char *layout = getenv("MC_TEST_NETNS_LAYOUT");
  int block = layout && !strcmp(layout, "block");
  int host = netns_count <= 0 ? rank : block ? rank * netns_count / size : rank % netns_count;
  char path[256];
  snprintf(path, sizeof path, "/var/run/netns/%s-r%d", netns_prefix, host);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || setns(fd, CLONE_NEWNET)) {
    perror(path);
    _exit(2);
  }
  close(fd);
}

void mc_harness_netns(const char *prefix, int count) {
  snprintf(netns_prefix, sizeof netns_prefix, "%s", prefix);
  netns_count = count;
}

static int find(const char *key) {
  for (int i = 0; i < shared->nkeys; i++)
    if (!strcmp(shared->entry[i].key, key))
      return i;
  return -1;
}

static void full_key(store_ctx_t *c, const char *key, char *out) {
  size_t n = strlen(c->prefix);
  memcpy(out, c->prefix, n);
  out[n] = '/';
  snprintf(out + n + 1, 96 - n - 1, "%.60s", key);
}

static mc_status_t store_set(void *ctx, const char *key, const void *val, size_t len) {
  char k[96];
  full_key(ctx, key, k);
  if (len > STORE_VAL)
    return MC_ERR_INVALID;
  pthread_mutex_lock(&shared->lock);
  int i = find(k);
  if (i < 0 && shared->nkeys < STORE_KEYS)
    i = shared->nkeys++, strcpy(shared->entry[i].key, k);
  if (i >= 0)
    memcpy(shared->entry[i].val, val, len), shared->entry[i].len = len;
  pthread_cond_broadcast(&shared->changed);
  pthread_mutex_unlock(&shared->lock);
  return i >= 0 ? MC_OK : MC_ERR_NOMEM;
}

static mc_status_t store_get(void *ctx, const char *key, void **val, size_t *len, int timeout_ms) {
  char k[96];
  full_key(ctx, key, k);
  struct timespec until;
  clock_gettime(CLOCK_MONOTONIC, &until);
  until.tv_sec += timeout_ms / 1000;
  until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
  if (until.tv_nsec >= 1000000000)
    until.tv_sec++, until.tv_nsec -= 1000000000;
  pthread_mutex_lock(&shared->lock);
  int i;
  while ((i = find(k)) < 0)
    if (pthread_cond_timedwait(&shared->changed, &shared->lock, &until) == ETIMEDOUT)
      break;
  if (i >= 0) {
    *len = shared->entry[i].len;
    *val = malloc(*len ? *len : 1);
    memcpy(*val, shared->entry[i].val, *len);
  }
  pthread_mutex_unlock(&shared->lock);
  return i >= 0 ? MC_OK : MC_ERR_TIMEOUT;
}

static mc_status_t store_add(void *ctx, const char *key, int64_t delta, int64_t *out) {
  char k[96];
  full_key(ctx, key, k);
  pthread_mutex_lock(&shared->lock);
  int i = find(k);
  if (i < 0 && shared->nkeys < STORE_KEYS) {
    i = shared->nkeys++;
    strcpy(shared->entry[i].key, k);
    shared->entry[i].len = sizeof(int64_t);
    memset(shared->entry[i].val, 0, sizeof(int64_t));
  }
  int64_t v;
  memcpy(&v, shared->entry[i].val, sizeof v);
  v += delta;
  memcpy(shared->entry[i].val, &v, sizeof v);
  pthread_cond_broadcast(&shared->changed);
  pthread_mutex_unlock(&shared->lock);
  if (out)
    *out = v;
  return MC_OK;
}

void mc_harness_store(mc_store_t *out, const char *prefix) {
  store_ctx_t *c = calloc(1, sizeof *c);
  c->shared = shared;
  snprintf(c->prefix, sizeof c->prefix, "%s", prefix);
  *out = (mc_store_t){.ctx = c, .set = store_set, .get = store_get, .add = store_add};
}

void mc_harness_barrier(const char *name, int size) {
  char k[96];
  snprintf(k, sizeof k, "barrier/%s", name);
  int64_t v;
  store_add(&default_ctx, k, 1, &v);
  pthread_mutex_lock(&shared->lock);
  for (;;) {
    char fk[96];
    full_key(&default_ctx, k, fk);
    int i = find(fk);
    memcpy(&v, shared->entry[i].val, sizeof v);
    if (v >= size)
      break;
    pthread_cond_wait(&shared->changed, &shared->lock);
  }
  pthread_mutex_unlock(&shared->lock);
}

static void init_shared(void) {
  shared = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
  pthread_mutex_init(&shared->lock, &ma);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&shared->changed, &ca);
  default_ctx.shared = shared;
  snprintf(default_ctx.prefix, sizeof default_ctx.prefix, "job");
}

static int run_rank(int rank, int size, mc_test_body_t body, void *arg) {
  mc_store_t store = {.ctx = &default_ctx, .set = store_set, .get = store_get, .add = store_add};
  mc_config_t cfg;
  mc_config_init(&cfg);
  cfg.timeout_ms = 60000;
  cfg.name = "test";
  mc_comm_t *comm;
  mc_status_t st = mc_comm_create(&cfg, &store, rank, size, &comm);
  if (st != MC_OK) {
    fprintf(stderr, "rank %d: mc_comm_create: %s: %s\n", rank, mc_status_str(st), mc_last_error());
    return 1;
  }
  int rc = body(comm, arg);
  mc_comm_destroy(comm);
  fflush(NULL); /* the rank leaves through _exit */
  return rc;
}

void mc_harness_expect_death(int rank) { shared->expected_death[rank] = 1; }
void *mc_harness_scratch(void) { return shared->scratch; }

int mc_harness_run(int size, mc_test_body_t body, void *arg, int timeout_s) {
  if (!shared)
    init_shared();
  const char *netns = getenv("MC_TEST_NETNS"); /* <prefix>:<count> */
  if (netns && !netns_prefix[0]) {
    const char *colon = strrchr(netns, ':');
    char prefix[200];
    snprintf(prefix, sizeof prefix, "%.*s", colon ? (int)(colon - netns) : (int)strlen(netns),
             netns);
    mc_harness_netns(prefix, colon ? atoi(colon + 1) : 0);
  }
  shared->nkeys = 0;
  memset(shared->expected_death, 0, sizeof shared->expected_death);
  memset(shared->scratch, 0, sizeof shared->scratch);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  sigprocmask(SIG_BLOCK, &chld, NULL);
  pid_t pids[256];
  fflush(NULL);
  for (int r = 0; r < size; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      if (netns_prefix[0])
        enter_netns(r, size);
      if (on_fork)
        on_fork(r, on_fork_arg);
      _exit(run_rank(r, size, body, arg));
    }
  }
  int failed = 0, left = size;
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  while (left > 0) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      left--;
      for (int r = 0; r < size; r++)
        if (pids[r] == pid) {
          pids[r] = 0;
          if ((!WIFEXITED(status) || WEXITSTATUS(status)) && !shared->expected_death[r]) {
            fprintf(stderr, "harness: rank %d %s %d\n", r,
                    WIFEXITED(status) ? "exited with" : "killed by signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            failed = 1;
          }
        }
    }
    if (left == 0)
      break;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long remaining = timeout_s - (now.tv_sec - start.tv_sec);
    if (remaining <= 0) {
      fprintf(stderr, "harness: %d rank(s) still running after %d s: killing (hang)\n", left,
              timeout_s);
      for (int r = 0; r < size; r++)
        if (pids[r] > 0)
          kill(pids[r], SIGKILL), waitpid(pids[r], NULL, 0);
      return 1;
    }
    struct timespec wait = {.tv_sec = remaining > 1 ? 1 : remaining};
    sigtimedwait(&chld, NULL, &wait); /* wakes on any child exit */
  }
  return failed;
}
