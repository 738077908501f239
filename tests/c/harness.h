/* Multi-process test harness: forks N ranks that share a key-value store in shared memory,
 * each creating a real communicator over the transport chosen by MC_TRANSPORT. */
#ifndef MC_TEST_HARNESS_H
#define MC_TEST_HARNESS_H

#include <stdio.h>
#include <stdlib.h>

#include "mooncake/mooncake.h"

typedef int (*mc_test_body_t)(mc_comm_t *comm, void *arg);

/* Runs body on `size` forked ranks (each gets its own communicator) and returns 0 when every
 * rank returned 0 and exited within timeout_s seconds; stragglers are killed. */
int mc_harness_run(int size, mc_test_body_t body, void *arg, int timeout_s);

/* Called in each forked rank before its communicator is created (e.g. to set its environment);
 * NULL: nothing. */
void mc_harness_on_fork(void (*fn)(int rank, void *arg), void *arg);
/* Rank r enters the network namespace /var/run/netns/<prefix>-r<r % count> before it creates
 * its communicator: `count` "hosts" joined by veth links (python/mooncake/fault/netns.py makes
 * them). The environment variable MC_TEST_NETNS=<prefix>:<count> does the same for any test;
 * MC_TEST_NETNS_LAYOUT=block puts rank r on host r * count / size instead. */
void mc_harness_netns(const char *prefix, int count);

/* The shared store, for ranks that create further communicators. `prefix` keeps their keys
 * apart. */
void mc_harness_store(mc_store_t *out, const char *prefix);
/* This rank is about to die on purpose: its death by a signal or exit status is not a failure. */
void mc_harness_expect_death(int rank);
/* 64 KiB shared by the ranks of one run, zeroed at its start (timestamps, pids). */
void *mc_harness_scratch(void);
/* A barrier among the harness ranks through the store (test control only). */
void mc_harness_barrier(const char *name, int size);

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "CHECK failed %s:%d: %s: ", __FILE__, __LINE__, #cond);                      \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fprintf(stderr, "\n");                                                                       \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

/* Starts op (an mc_* call filling `req`), waits for it and checks it succeeded. */
#define RUN_OK(req, call)                                                                          \
  do {                                                                                             \
    mc_status_t st_ = (call);                                                                      \
    CHECK(st_ == MC_OK, "%s: %s", mc_status_str(st_), mc_last_error());                            \
    st_ = mc_wait(req, 60000);                                                                     \
    CHECK(st_ == MC_OK, "%s: %s", mc_status_str(st_), mc_request_error(req));                      \
    mc_request_free(req);                                                                          \
  } while (0)

#endif
