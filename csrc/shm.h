/* The intra-host path (backend/shm): among the ranks of a communicator on this host (all of them,
 * or this host's group of a communicator that spans hosts: coll/hier.c), collectives run
 * through shared memory instead of the transport. Ranks are numbered within the group here
 * (comm->local), and so is a request's root. Each rank owns
 * one segment (a header of flags, then double-buffered slots) that it alone writes; peers map
 * it read-only and read from it directly. Called from the progress thread only, except
 * create/destroy. */
#ifndef MOONCAKE_SHM_H
#define MOONCAKE_SHM_H

#include <stdbool.h>
#include <stddef.h>

#include "mooncake/mooncake.h"

typedef struct mc_shm mc_shm_t;

/* Creates this rank's segment for the communicator (its id, epoch and members must be set).
 * Peers attach at the first operation; the names are removed once every peer has attached. */
mc_status_t mc_shm_create(mc_comm_t *comm, char *err, size_t errlen);
void mc_shm_destroy(mc_comm_t *comm);
/* Removes this rank's names now (peers that have not attached yet never will). */
void mc_shm_unlink(mc_comm_t *comm);
/* The communicator is revoked or being destroyed: peers stop waiting for this rank. */
void mc_shm_leave(mc_comm_t *comm, mc_status_t st, const char *why);

/* Operations the shm path runs (the algorithm choice, coll/select.c, decides which do). */
bool mc_shm_supports(int kind);

/* Advances the shm operations of the communicator, one at a time in submission order; true
 * if anything moved. */
bool mc_shm_progress(mc_comm_t *comm);
/* Starts (the first time) and advances one shm request that a hierarchical operation runs as
 * a stage; true if it moved. */
bool mc_shm_run(mc_comm_t *comm, mc_request_t *req);

/* Before the progress thread sleeps: false if an awaited flag is already set; otherwise the
 * fd a peer writes to after setting a flag this rank waits for. */
bool mc_shm_prepare_sleep(mc_comm_t *comm, int *fd);
void mc_shm_after_sleep(mc_comm_t *comm);
/* Wakes whoever sleeps on this rank's FIFO (a request of a sleeping caller completed). */
void mc_shm_wake_self(mc_comm_t *comm);

/* For timeout messages: the ranks the current shm operation waits for, e.g. "shm flags of 1, 3". */
void mc_shm_waiting_for(const mc_request_t *req, char *out, size_t len);

#endif
