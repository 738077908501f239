/* Fault injection for tests and the fault harness (python -m mooncake.fault), driven by one
 * variable read once:
 *   MC_FAULT="rank=2,op=allreduce,seq=57,phase=3,action=kill;rank=0,op=agree,phase=commit,..."
 * Each rule fires once, at the first point that matches every field it names. rank is the
 * rank the process had when the first communicator of its lineage was created; op is an
 * operation name or "agree"; phase is an algorithm step number, or an agreement phase
 * (prepare, promise, accept, commit, commit-partial: after the first member got
 * the decision). Actions: kill (SIGKILL), stop (SIGSTOP), exit (_exit),
 * delay:MS, error (the operation fails as if its peer link broke). */
#ifndef MOONCAKE_FAULT_H
#define MOONCAKE_FAULT_H

#include <stdbool.h>
#include <stdint.h>

/* Returns true when an "error" rule fired here; other actions act and return false. */
bool mc_fault_point(int rank, const char *op, int64_t seq, const char *phase);

#endif
