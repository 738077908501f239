/* The control plane: failure detection, revoke, agreement and the address exchange of shrink.
 *
 * One control plane serves a communicator and every communicator shrunk from it (a lineage);
 * ranks here are lineage ranks, the ranks of the communicator it was created for. Each process
 * keeps one small TCP connection to every other and a thread that waits on all of them:
 *  - a closed connection means the peer process is gone (detected at once);
 *  - silence for MC_FAILURE_TIMEOUT_MS (heartbeats every MC_HEARTBEAT_MS) means hung or cut off;
 *  - a rank that suspects a peer cuts it off (tells it, closes the connection) and tells the
 *    others, so a suspicion is never half-believed: the suspected rank is out for everyone.
 * Failure knowledge only grows. After start-up nothing here needs the store or rank 0. */
#ifndef MOONCAKE_CTRL_H
#define MOONCAKE_CTRL_H

#include "mooncake/mooncake.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct mc_ctrl mc_ctrl_t;

/* Listens; *addr receives "ip:port" to publish. loopback: every rank is on this host. */
mc_status_t mc_ctrl_create(int rank, int size, uint64_t secret, bool loopback, mc_ctrl_t **out,
                           char *addr, size_t addrlen, char *err, size_t errlen);
/* Builds the mesh from everyone's published address and waits until it is complete. */
mc_status_t mc_ctrl_connect(mc_ctrl_t *c, char *const *addrs, int timeout_ms, char *err,
                            size_t errlen);
/* Communicators register so that a failure or revoke reaches them; the last detach says
 * goodbye to the peers and frees the control plane. */
void mc_ctrl_attach(mc_ctrl_t *c, mc_comm_t *comm);
void mc_ctrl_detach(mc_ctrl_t *c, mc_comm_t *comm);

/* Tells every peer that the communicator of this epoch is revoked. */
void mc_ctrl_revoke(mc_ctrl_t *c, uint32_t epoch, const char *why);
/* Declares a rank failed here and everywhere (shrink's explicit exclusion). */
void mc_ctrl_exclude(mc_ctrl_t *c, int rank, const char *why);
bool mc_ctrl_is_failed(mc_ctrl_t *c, int rank);
/* Fills why (if failed) and returns whether the rank is known failed. */
bool mc_ctrl_failure(mc_ctrl_t *c, int rank, char *why, size_t len);

/* Fault-tolerant agreement on the failed members of the communicator at `epoch`: every caller
 * gets the same set (a bitmap over lineage ranks, mc_ctrl_words() words), even if ranks die
 * while it runs. A decision once made never changes. */
int mc_ctrl_words(const mc_ctrl_t *c);
mc_status_t mc_ctrl_agree(mc_ctrl_t *c, uint32_t epoch, const int *members, int n, int timeout_ms,
                          uint64_t *failed, char *err, size_t errlen);
/* Gives this rank's transport address to the members of the communicator at `epoch` and
 * collects theirs (malloc'd; NULL for a member that failed first). */
mc_status_t mc_ctrl_exchange(mc_ctrl_t *c, uint32_t epoch, const int *members, int n,
                             const void *addr, size_t len, int timeout_ms, void **addrs,
                             size_t *lens, char *err, size_t errlen);

/* Tells the members that this rank will not join the communicator at `epoch` after all (its
 * shrink failed locally): they stop waiting for its address and treat it as failed. */
void mc_ctrl_withdraw(mc_ctrl_t *c, uint32_t epoch, const int *members, int n);

/* Pre-connection of standby endpoints (comm.c): sends this rank's standby address for `epoch`
 * to the members (NULL: it has none, and the call returns at once) and waits until every member
 * not known failed has sent its own, *stop is set (then mc_ctrl_kick), or timeout_ms passes.
 * addrs[i] gets a malloc'd copy (NULL for this rank and failed members). MC_OK only if every
 * live member has one. */
mc_status_t mc_ctrl_standby_exchange(mc_ctrl_t *c, uint32_t epoch, const int *members, int n,
                                     const void *addr, size_t len, const atomic_bool *stop,
                                     int timeout_ms, void **addrs, size_t *lens);
/* Wakes the threads waiting in the calls above (to see a stop flag). */
void mc_ctrl_kick(mc_ctrl_t *c);

#endif
