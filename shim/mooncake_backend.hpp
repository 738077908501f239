// c10d::Backend over the Mooncake C engine (CPU tensors).
//
// The shim only validates arguments, lays tensors out as contiguous buffers and forwards to
// mc_* calls; the engine owns every algorithm. Errors found before any data moves become
// TypeError/ValueError; failures reported by the engine become c10::DistBackendError.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <mooncake/mooncake.h>

namespace mooncake {

class MooncakeWork;

// Completes works (copy-back, Work::finish, future callbacks) off the engine's progress thread,
// whose completion callback only hands the work over, so user `.then()` callbacks never stall
// the engine.
//
// Order: works are numbered in issue order and released (counted complete, futures marked) in
// that order, as on an NCCL stream, whatever order the engine finishes them in. Their callbacks
// run one at a time in that order ("the lane"), so collectives that callbacks issue are issued
// in the same order on every rank. A work issued from inside a callback (PowerSGD's callbacks
// issue a collective and wait on its future) is released past the lane by another thread, or
// the lane would wait on itself. Threads are started when all are busy, up to kMaxThreads.
class Completer : public std::enable_shared_from_this<Completer> {
public:
  void start();
  // Work number `seq` finished in the engine (`work` null: a number never to be completed).
  void push(uint64_t seq, c10::intrusive_ptr<MooncakeWork> work);
  // Waits until works 0..seq are all released; false on timeout (negative: no limit).
  // Waits until work `seq` is released. While `waiter` waits here, releasing it leaves its
  // completion to the waiter (no completer thread is woken for it); on timeout it is the
  // completer's again.
  bool waitReleased(uint64_t seq, std::chrono::milliseconds timeout, MooncakeWork *waiter);
  void markWaited(MooncakeWork *work);   // before waiting: see waitReleased
  bool unmarkWaited(MooncakeWork *work); // giving up; true if released meanwhile
  // Completes what is queued, then stops the threads. Safe to call from a completer thread.
  void stop();
  static bool onCompleterThread();

private:
  static constexpr int kMaxThreads = 16;
  void spawnLocked();
  void run();

  std::mutex mu_;
  std::condition_variable cv_;                                   // work for the threads, or stop
  std::condition_variable releasedCv_;                           // next_ advanced
  std::map<uint64_t, c10::intrusive_ptr<MooncakeWork>> arrived_; // finished, not yet released
  uint64_t next_ = 0;                                            // lowest number not released
  std::deque<c10::intrusive_ptr<MooncakeWork>> lane_;   // released, callbacks one at a time
  std::deque<c10::intrusive_ptr<MooncakeWork>> nested_; // released, issued from a callback
  bool laneBusy_ = false;
  bool stopping_ = false;
  int idle_ = 0; // threads not busy completing a work (started ones count as idle)
  std::vector<std::thread> threads_;
};

class MooncakeWork : public c10d::Work {
public:
  MooncakeWork(int rank, c10d::OpType type, const char *title, std::string what,
               std::vector<at::Tensor> outputs, std::shared_ptr<Completer> completer);
  ~MooncakeWork() override;

  bool isCompleted() override;
  bool isSuccess() const override;
  std::exception_ptr exception() const override;
  int sourceRank() const override;
  std::vector<at::Tensor> result() override;
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;

  // Finishes the work exactly once, whoever calls first (wait() or the completion thread);
  // the request must be complete.
  void complete();

private:
  friend class MooncakeBackend;
  friend class Completer;
  static void onEngineComplete(mc_request_t *req, void *arg);

  mc_request_t *req_ = nullptr;
  const std::string what_;            // "mooncake rank R/N (group): op", prefix of messages
  std::vector<at::Tensor> outputs_;   // result() and the future's value
  std::vector<at::Tensor> keepAlive_; // buffers the engine reads/writes until completion
  // (contiguous temp, user tensor) pairs copied on success: non-contiguous outputs,
  // allgather list outputs, coalesced allreduce.
  std::vector<std::pair<at::Tensor, at::Tensor>> copyBack_;
  std::shared_ptr<Completer> completer_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::once_flag finishOnce_;
  std::atomic<bool> futureDone_{false};
  int source_ = -1;
  uint64_t seq_ = 0;                  // issue order on its backend
  bool nested_ = false;               // issued from a completion callback
  std::atomic<bool> released_{false}; // it and every earlier work finished (set by Completer)
  bool waited_ = false; // a thread in wait() completes it once released (under Completer::mu_)
};

class MooncakeBackend : public c10d::Backend {
public:
  struct Options : c10d::Backend::Options {
    explicit Options(std::chrono::milliseconds timeout)
        : c10d::Backend::Options("mooncake", timeout) {}
    c10::intrusive_ptr<c10d::Backend::Options> clone() const override {
      return c10::make_intrusive<Options>(*this);
    }
  };

  // Collective over the group: rendezvous through `store` (blocks until every rank arrives or
  // the timeout passes). Call without the GIL.
  MooncakeBackend(const c10::intrusive_ptr<c10d::Store> &store, int rank, int size,
                  std::chrono::milliseconds timeout, const std::string &groupName);
  // Adopts a communicator made by mc_comm_shrink of `parent`'s.
  MooncakeBackend(const MooncakeBackend &parent, mc_comm_t *comm);
  ~MooncakeBackend() override;

  const std::string getBackendName() const override { return "mooncake"; }
  c10::intrusive_ptr<c10d::Backend::Options> getBackendOptions() override { return options_; }
  void setTimeout(std::chrono::milliseconds timeout) override;
  // split_group(): members of `ranks` (parent ranks, in the child's rank order) build a new
  // communicator through `store` (already private to the child group); others get nullptr.
  bool supportsSplitting() const override { return true; }
  c10::intrusive_ptr<c10d::Backend>
  split(const c10::intrusive_ptr<c10d::Store> &store, const std::vector<int> &ranks,
        const c10::intrusive_ptr<c10d::Backend::Options> &opts) override;
  void abort() override;
  void shutdown() override;
  std::string transport();

  // Fault tolerance (docs/fault-tolerance.md).
  bool supportsShrinking() const override { return true; }
  // Empty ranks_to_exclude: the survivors agree on who failed (mooncake.shrink).
  c10::intrusive_ptr<c10d::Backend>
  shrink(const std::vector<int64_t> &ranks_to_exclude, int shrink_flags = 0,
         const c10::intrusive_ptr<c10d::Backend::Options> &opts_override = nullptr) override;
  std::vector<int64_t> failedRanks();
  // For a shrunk backend: the rank each of its ranks had in the group it was shrunk from.
  const std::vector<int64_t> &parentRanks() const { return parentRanks_; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor> &tensors,
                                           const c10d::BroadcastOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor> &tensors,
                                           const c10d::AllreduceOptions &opts) override;
  c10::intrusive_ptr<c10d::Work>
  allreduce_coalesced(std::vector<at::Tensor> &tensors,
                      const c10d::AllreduceCoalescedOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>> &outputs,
                                           std::vector<at::Tensor> &inputs,
                                           const c10d::AllgatherOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor &output, at::Tensor &input,
                                                 const c10d::AllgatherOptions &opts) override;
  c10::intrusive_ptr<c10d::Work>
  _reduce_scatter_base(at::Tensor &output, at::Tensor &input,
                       const c10d::ReduceScatterOptions &opts) override;
  // The deprecated list form (dist.all_gather_coalesced): outputs[r][i] gets rank r's inputs[i].
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>> &outputs,
                                                     std::vector<at::Tensor> &inputs,
                                                     const c10d::AllgatherOptions &opts) override;
  c10::intrusive_ptr<c10d::Work>
  allgather_into_tensor_coalesced(std::vector<at::Tensor> &outputs, std::vector<at::Tensor> &inputs,
                                  const c10d::AllgatherOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor> &outputs,
                                                std::vector<std::vector<at::Tensor>> &inputs,
                                                const c10d::ReduceScatterOptions &opts) override;
  c10::intrusive_ptr<c10d::Work>
  reduce_scatter_tensor_coalesced(std::vector<at::Tensor> &outputs, std::vector<at::Tensor> &inputs,
                                  const c10d::ReduceScatterOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor> &tensors,
                                        const c10d::ReduceOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>> &outputs,
                                        std::vector<at::Tensor> &inputs,
                                        const c10d::GatherOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor> &outputs,
                                         std::vector<std::vector<at::Tensor>> &inputs,
                                         const c10d::ScatterOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor> &outputs,
                                          std::vector<at::Tensor> &inputs,
                                          const c10d::AllToAllOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor &output, at::Tensor &input,
                                               std::vector<int64_t> &outputSplitSizes,
                                               std::vector<int64_t> &inputSplitSizes,
                                               const c10d::AllToAllOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions &opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor> &tensors, int dstRank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor> &tensors, int srcRank,
                                      int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor> &tensors, int tag) override;

private:
  struct Pending; // buffers and copy-back pairs gathered while validating an op
  std::string what(const char *op) const;
  c10::intrusive_ptr<c10d::Work>
  launch(const char *op, c10d::OpType type, Pending &&p,
         const std::function<mc_status_t(mc_comm_t *, mc_request_t **)> &issue);
  c10::intrusive_ptr<c10d::Work> reduceScatterFlat(const char *op, c10d::OpType type,
                                                   std::vector<at::Tensor> outputs,
                                                   std::vector<at::Tensor> blocks, size_t perRank,
                                                   const c10d::ReduceOp &reduceOp);
  c10::intrusive_ptr<c10d::Work> pointToPoint(const char *op, c10d::OpType type,
                                              std::vector<at::Tensor> &tensors, int peer, int tag);

  c10::intrusive_ptr<c10d::Store> store_; // outlives comm_: the engine may use it until destroy
  mc_store_t mcStore_{};
  std::string name_; // mc_config_t.name points here
  c10::intrusive_ptr<Options> options_;
  std::mutex commMu_; // guards comm_ against shutdown while ops are issued
  mc_comm_t *comm_ = nullptr;
  uint64_t nextSeq_ = 0; // numbers works in issue order (under commMu_)
  std::shared_ptr<Completer> completer_;
  std::vector<int64_t> parentRanks_;
};

} // namespace mooncake
