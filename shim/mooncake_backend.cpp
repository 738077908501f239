#include "mooncake_backend.hpp"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <ATen/core/grad_mode.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>

#include <Python.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>

namespace mooncake {
namespace {

std::exception_ptr backendError(const std::string &msg) {
  return std::make_exception_ptr(c10::DistBackendError({__func__, __FILE__, __LINE__}, msg));
}

int toMs(std::chrono::milliseconds t) {
  auto ms = t.count();
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

// ---- c10d::Store -> mc_store_t. Runs on whatever thread the engine uses; never takes the GIL
// (a Python-implemented store takes it by itself). c10 exceptions must not cross into C.

c10d::Store *asStore(void *ctx) { return static_cast<c10d::Store *>(ctx); }

mc_status_t storeStatus(const std::exception &e) {
  // Stores report an expired wait/get as DistStoreError "... timeout ...".
  const bool timeout = dynamic_cast<const c10::DistStoreError *>(&e) != nullptr &&
                       (std::strstr(e.what(), "imeout") || std::strstr(e.what(), "imed out"));
  return timeout ? MC_ERR_TIMEOUT : MC_ERR_TRANSPORT;
}

mc_status_t storeSet(void *ctx, const char *key, const void *val, size_t len) {
  try {
    const auto *p = static_cast<const uint8_t *>(val);
    asStore(ctx)->set(key, std::vector<uint8_t>(p, p + len));
    return MC_OK;
  } catch (const std::exception &e) {
    return storeStatus(e);
  }
}

mc_status_t storeGet(void *ctx, const char *key, void **val, size_t *len, int timeout_ms) {
  try {
    auto *store = asStore(ctx);
    // wait() bounds the blocking part by the engine's deadline instead of the store's default.
    if (timeout_ms > 0) {
      store->wait({key}, std::chrono::milliseconds(timeout_ms));
    }
    std::vector<uint8_t> v = store->get(key);
    void *out = std::malloc(v.empty() ? 1 : v.size()); // engine releases with free()
    if (out == nullptr) {
      return MC_ERR_NOMEM;
    }
    if (!v.empty()) {
      std::memcpy(out, v.data(), v.size());
    }
    *val = out;
    *len = v.size();
    return MC_OK;
  } catch (const std::exception &e) {
    return storeStatus(e);
  }
}

mc_status_t storeAdd(void *ctx, const char *key, int64_t delta, int64_t *out) {
  try {
    int64_t v = asStore(ctx)->add(key, delta);
    if (out != nullptr) {
      *out = v;
    }
    return MC_OK;
  } catch (const std::exception &e) {
    return storeStatus(e);
  }
}

// ---- argument checks: all run before anything reaches the engine.

mc_dtype_t toDtype(const at::Tensor &t, const std::string &what) {
  switch (t.scalar_type()) {
  case at::kFloat: return MC_FLOAT32;
  case at::kDouble: return MC_FLOAT64;
  case at::kHalf: return MC_FLOAT16;
  case at::kBFloat16: return MC_BFLOAT16;
  case at::kChar: return MC_INT8;
  case at::kShort: return MC_INT16;
  case at::kInt: return MC_INT32;
  case at::kLong: return MC_INT64;
  case at::kByte: return MC_UINT8;
  case at::kBool: return MC_BOOL;
  case at::kComplexFloat: return MC_COMPLEX64;
  case at::kComplexDouble: return MC_COMPLEX128;
  case at::kFloat8_e4m3fn: return MC_FLOAT8_E4M3FN;
  case at::kFloat8_e5m2: return MC_FLOAT8_E5M2;
  case at::kFloat8_e4m3fnuz: return MC_FLOAT8_E4M3FNUZ;
  case at::kFloat8_e5m2fnuz: return MC_FLOAT8_E5M2FNUZ;
  case at::kFloat8_e8m0fnu: return MC_FLOAT8_E8M0FNU;
  default:
    TORCH_CHECK_TYPE(false, what, ": unsupported dtype ", t.scalar_type(),
                     " (supported: float32, float64, float16, bfloat16, int8, int16, int32, "
                     "int64, uint8, bool, complex64, complex128, and the float8 types for "
                     "non-reducing operations)");
  }
  return MC_DTYPE_COUNT; // unreachable
}

const char *torchOpName(c10d::ReduceOp::RedOpType op) {
  switch (op) {
  case c10d::ReduceOp::SUM: return "SUM";
  case c10d::ReduceOp::AVG: return "AVG";
  case c10d::ReduceOp::PRODUCT: return "PRODUCT";
  case c10d::ReduceOp::MIN: return "MIN";
  case c10d::ReduceOp::MAX: return "MAX";
  case c10d::ReduceOp::BAND: return "BAND";
  case c10d::ReduceOp::BOR: return "BOR";
  case c10d::ReduceOp::BXOR: return "BXOR";
  case c10d::ReduceOp::PREMUL_SUM: return "PREMUL_SUM";
  default: return "unknown";
  }
}

// A reduce op as the engine takes it: an mc_redop_t, or PREMUL_SUM with its factor.
struct Reduction {
  mc_redop_t op = MC_SUM;
  bool premul = false;
  double factor = 1.0;
};

// Maps torch's op and checks the engine supports it for `dtype`, before any data moves.
Reduction toReduction(const c10d::ReduceOp &op, const at::Tensor &t, mc_dtype_t dt,
                      const std::string &what) {
  Reduction r;
  switch (op.op_) {
  case c10d::ReduceOp::SUM: r.op = MC_SUM; break;
  case c10d::ReduceOp::AVG: r.op = MC_AVG; break;
  case c10d::ReduceOp::PRODUCT: r.op = MC_PRODUCT; break;
  case c10d::ReduceOp::MIN: r.op = MC_MIN; break;
  case c10d::ReduceOp::MAX: r.op = MC_MAX; break;
  case c10d::ReduceOp::BAND: r.op = MC_BAND; break;
  case c10d::ReduceOp::BOR: r.op = MC_BOR; break;
  case c10d::ReduceOp::BXOR: r.op = MC_BXOR; break;
  case c10d::ReduceOp::PREMUL_SUM: {
    r.op = MC_PREMUL_SUM;
    r.premul = true;
    // torch attaches the factor as a supplement: a double or a one-element tensor.
    const auto *sup = dynamic_cast<const c10d::PreMulSumSupplement *>(op.supplement_.get());
    TORCH_CHECK_VALUE(sup != nullptr, what, ": reduce op PREMUL_SUM came without its factor");
    if (sup->tensor_factor.defined()) {
      TORCH_CHECK_VALUE(sup->tensor_factor.numel() == 1, what,
                        ": PREMUL_SUM factor must have one element, got ",
                        sup->tensor_factor.numel());
      TORCH_CHECK_TYPE(!sup->tensor_factor.is_complex(), what,
                       ": PREMUL_SUM factor must be real, got ", sup->tensor_factor.scalar_type());
      r.factor = sup->tensor_factor.item<double>();
    } else {
      r.factor = sup->double_factor;
    }
    break;
  }
  default: TORCH_CHECK_VALUE(false, what, ": unsupported reduce op ", static_cast<int>(op.op_));
  }
  const char *why = r.op == MC_BAND || r.op == MC_BOR || r.op == MC_BXOR
                        ? "bitwise ops take integer and bool tensors only"
                    : r.op == MC_PREMUL_SUM ? "PREMUL_SUM takes floating-point tensors only"
                    : t.is_complex()        ? "complex tensors take SUM, AVG and PRODUCT only"
                    : isFloat8Type(t.scalar_type()) ? "float8 tensors cannot be reduced"
                                                    : "not defined for this dtype";
  TORCH_CHECK_TYPE(mc_reduce_supported(dt, r.op) == MC_OK, what, ": reduce op ",
                   torchOpName(op.op_), " is not supported for dtype ", t.scalar_type(), " (", why,
                   ")");
  return r;
}

mc_status_t issueAllreduce(mc_comm_t *c, const void *in, void *out, size_t n, mc_dtype_t dt,
                           Reduction red, mc_request_t **r) {
  return red.premul ? mc_allreduce_premul(c, in, out, n, dt, red.factor, r)
                    : mc_allreduce(c, in, out, n, dt, red.op, r);
}

mc_status_t issueReduceScatter(mc_comm_t *c, const void *in, void *out, size_t n, mc_dtype_t dt,
                               Reduction red, mc_request_t **r) {
  return red.premul ? mc_reduce_scatter_premul(c, in, out, n, dt, red.factor, r)
                    : mc_reduce_scatter(c, in, out, n, dt, red.op, r);
}

mc_status_t issueReduce(mc_comm_t *c, const void *in, void *out, size_t n, mc_dtype_t dt,
                        Reduction red, int root, mc_request_t **r) {
  return red.premul ? mc_reduce_premul(c, in, out, n, dt, red.factor, root, r)
                    : mc_reduce(c, in, out, n, dt, red.op, root, r);
}

// A dense CPU tensor the engine can take; returns its dtype.
mc_dtype_t checkTensor(const at::Tensor &t, const std::string &what) {
  TORCH_CHECK_VALUE(t.defined(), what, ": undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, ": tensor is on device ", t.device(),
                    "; the mooncake backend only handles CPU tensors");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, what,
                    ": only dense (strided) tensors are "
                    "supported, got layout ",
                    t.layout());
  return toDtype(t, what);
}

void checkSingle(const std::vector<at::Tensor> &tensors, const std::string &what) {
  TORCH_CHECK_VALUE(tensors.size() == 1, what, ": expects exactly one tensor per call, got ",
                    tensors.size());
}

size_t count(const at::Tensor &t) { return static_cast<size_t>(t.numel()); }

// Every tensor of `ts` is a dense CPU tensor of `like`'s dtype (and numel, when `numel` >= 0).
void checkAll(const std::vector<at::Tensor> &ts, const at::Tensor &like, int64_t numel,
              const std::string &what, const char *role) {
  for (size_t i = 0; i < ts.size(); ++i) {
    checkTensor(ts[i], what);
    TORCH_CHECK_TYPE(ts[i].scalar_type() == like.scalar_type(), what, ": ", role, " ", i,
                     " has dtype ", ts[i].scalar_type(), ", expected ", like.scalar_type());
    TORCH_CHECK_VALUE(numel < 0 || ts[i].numel() == numel, what, ": ", role, " ", i, " has ",
                      ts[i].numel(), " elements, expected ", numel);
  }
}

void checkRoot(int64_t root, int size, const std::string &what) {
  TORCH_CHECK_VALUE(root >= 0 && root < size, what, ": root rank ", root, " is out of range [0, ",
                    size, ")");
}

at::Tensor flatCat(const std::vector<at::Tensor> &ts) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto &t : ts) {
    flat.push_back(t.reshape({-1}));
  }
  return at::cat(flat);
}

} // namespace

// Buffers of one op, gathered while its arguments are checked.
struct MooncakeBackend::Pending {
  std::vector<at::Tensor> outputs;
  std::vector<at::Tensor> keepAlive;
  std::vector<std::pair<at::Tensor, at::Tensor>> copyBack;

  // Contiguous buffer for `t`: t itself, or a temp (filled from t when `in`, copied back into t
  // on success when `out`). The engine copies nothing on our behalf.
  at::Tensor buffer(const at::Tensor &t, bool in, bool out) {
    if (t.is_contiguous()) {
      keepAlive.push_back(t);
      return t;
    }
    at::Tensor tmp = in ? t.contiguous() : at::empty(t.sizes(), t.options());
    keepAlive.push_back(tmp);
    if (out) {
      copyBack.emplace_back(tmp, t);
    }
    return tmp;
  }
};

// ---------------------------------------------------------------- Completer

namespace {
thread_local bool tlsCompleterThread = false;
} // namespace

bool Completer::onCompleterThread() { return tlsCompleterThread; }

void Completer::start() {
  std::lock_guard<std::mutex> g(mu_);
  spawnLocked();
}

void Completer::spawnLocked() {
  ++idle_;
  // A thread keeps its Completer alive: works (and so the queue) may outlive the backend.
  threads_.emplace_back([self = shared_from_this()] {
    tlsCompleterThread = true;
    self->run();
  });
}

void Completer::push(uint64_t seq, c10::intrusive_ptr<MooncakeWork> work) {
  std::vector<c10::intrusive_ptr<MooncakeWork>> inline_;
  {
    std::lock_guard<std::mutex> g(mu_);
    arrived_.emplace(seq, std::move(work));
    bool released = false, queued = false;
    while (!arrived_.empty() && arrived_.begin()->first == next_) {
      auto w = std::move(arrived_.begin()->second);
      arrived_.erase(arrived_.begin());
      ++next_;
      released = true;
      if (!w) {
        continue;
      }
      w->released_ = true;
      if (w->waited_) {
        continue; // its waiter completes it: no thread wake-up on the way
      }
      if (stopping_) {
        inline_.push_back(std::move(w)); // no threads any more
      } else {
        (w->nested_ ? nested_ : lane_).push_back(std::move(w));
        queued = true;
      }
    }
    if (released) {
      releasedCv_.notify_all();
    }
    // Only queued work wakes the completion threads: a waited work is its waiter's, and waking
    // them for nothing cost two context switches per blocking operation.
    if (queued) {
      const bool runnable = !nested_.empty() || (!laneBusy_ && !lane_.empty());
      if (runnable && idle_ == 0 && static_cast<int>(threads_.size()) < kMaxThreads && !stopping_) {
        spawnLocked(); // every thread is inside a (possibly blocking) callback
      }
      cv_.notify_all();
    }
  }
  for (auto &w : inline_) {
    w->complete();
  }
}

bool Completer::waitReleased(uint64_t seq, std::chrono::milliseconds timeout,
                             MooncakeWork *waiter) {
  std::unique_lock<std::mutex> lk(mu_);
  auto done = [&] { return next_ > seq; };
  if (timeout.count() < 0) {
    releasedCv_.wait(lk, done);
    return true;
  }
  if (releasedCv_.wait_for(lk, timeout, done)) {
    return true;
  }
  waiter->waited_ = false; // gives up: the completer completes it once released
  return false;
}

bool Completer::unmarkWaited(MooncakeWork *work) {
  std::lock_guard<std::mutex> g(mu_);
  work->waited_ = false;
  return work->released_;
}

void Completer::markWaited(MooncakeWork *work) {
  std::lock_guard<std::mutex> g(mu_);
  if (!work->released_) {
    work->waited_ = true;
  }
}

void Completer::run() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stopping_ || !nested_.empty() || (!laneBusy_ && !lane_.empty()); });
    c10::intrusive_ptr<MooncakeWork> work;
    const bool lane = nested_.empty() && !laneBusy_ && !lane_.empty();
    if (!nested_.empty()) {
      work = std::move(nested_.front());
      nested_.pop_front();
    } else if (lane) {
      work = std::move(lane_.front());
      lane_.pop_front();
      laneBusy_ = true;
    } else {
      return; // stopping, and what is left is another thread's (the busy lane's)
    }
    --idle_;
    lk.unlock();
    work->complete();
    work.reset(); // may drop the last reference to a backend: outside the lock
    lk.lock();
    ++idle_;
    if (lane) {
      laneBusy_ = false;
      cv_.notify_all();
    }
  }
}

void Completer::stop() {
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
    threads.swap(threads_);
  }
  cv_.notify_all();
  for (auto &t : threads) {
    if (t.get_id() == std::this_thread::get_id()) {
      t.detach(); // last backend reference dropped by a future callback: can't join self
    } else {
      t.join();
    }
  }
}

// ---------------------------------------------------------------- MooncakeWork

MooncakeWork::MooncakeWork(int rank, c10d::OpType type, const char *title, std::string what,
                           std::vector<at::Tensor> outputs, std::shared_ptr<Completer> completer)
    : c10d::Work(rank, type, title), what_(std::move(what)), outputs_(std::move(outputs)),
      completer_(std::move(completer)), future_(c10::make_intrusive<c10::ivalue::Future>(
                                            c10::ListType::create(c10::TensorType::get()))) {}

MooncakeWork::~MooncakeWork() {
  if (req_ != nullptr) {
    mc_request_free(req_);
  }
}

void MooncakeWork::onEngineComplete(mc_request_t * /*req*/, void *arg) {
  // Runs on the engine's progress thread: hand off and return at once. `arg` carries the
  // reference taken when the callback was registered.
  auto work = c10::intrusive_ptr<MooncakeWork>::reclaim(static_cast<MooncakeWork *>(arg));
  auto completer = work->completer_;
  const uint64_t seq = work->seq_;
  completer->push(seq, std::move(work));
}

void MooncakeWork::complete() {
  std::call_once(finishOnce_, [this] {
    int done = 0;
    mc_status_t st = mc_test(req_, &done);
    std::exception_ptr err;
    if (!done) {
      err = backendError(what_ + ": internal error: completed before the engine finished");
    } else if (st != MC_OK) {
      const char *msg = mc_request_error(req_);
      err = backendError(what_ + " failed: " + (msg != nullptr && *msg ? msg : mc_status_str(st)));
    } else {
      try {
        at::NoGradGuard noGrad; // copy-back into user tensors is not part of any graph
        for (auto &[src, dst] : copyBack_) {
          dst.copy_(src);
        }
        if (opType_ == c10d::OpType::RECVANYSOURCE) {
          source_ = mc_request_source(req_);
        }
      } catch (const std::exception &e) {
        err = backendError(what_ + ": copying the result back failed: " + e.what());
      }
    }
    copyBack_.clear();
    keepAlive_.clear(); // the engine no longer touches the buffers
    finish(err);
  });
  // Separate from the once-block so a blocking user callback can't hold the others in call_once.
  if (!futureDone_.exchange(true)) {
    if (exception_) {
      future_->setError(exception_);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  }
}

bool MooncakeWork::isCompleted() {
  {
    std::lock_guard<std::mutex> g(mutex_);
    if (completed_) {
      return true;
    }
  }
  if (!released_) {
    return false; // it, or an earlier work, is still running
  }
  complete();
  return true;
}

bool MooncakeWork::isSuccess() const {
  const_cast<MooncakeWork *>(this)->isCompleted(); // pick up a failure nobody polled yet
  return c10d::Work::isSuccess();
}

std::exception_ptr MooncakeWork::exception() const {
  const_cast<MooncakeWork *>(this)->isCompleted();
  return c10d::Work::exception();
}

int MooncakeWork::sourceRank() const {
  TORCH_CHECK(opType_ == c10d::OpType::RECVANYSOURCE || opType_ == c10d::OpType::RECV, what_,
              ": sourceRank() is only defined for recv");
  TORCH_CHECK(const_cast<MooncakeWork *>(this)->isCompleted(), what_,
              ": sourceRank() called before the recv completed");
  return opType_ == c10d::OpType::RECVANYSOURCE ? source_ : mc_request_source(req_);
}

std::vector<at::Tensor> MooncakeWork::result() { return outputs_; }

bool MooncakeWork::wait(std::chrono::milliseconds timeout) {
  if (!isCompleted()) {
    // kNoTimeout (0): bounded by the operation's own deadline (the communicator timeout).
    const auto start = std::chrono::steady_clock::now();
    completer_->markWaited(this); // this thread completes it: no completer wake-up per op
    mc_wait(req_, timeout == kNoTimeout ? -1 : toMs(timeout));
    int done = 0;
    mc_test(req_, &done);
    if (!done && completer_->unmarkWaited(this)) {
      done = 1; // released while this thread was giving up: complete it here
    }
    if (done) {
      // Complete once every earlier work is: they end by their own deadlines too.
      auto left = std::chrono::milliseconds(-1);
      if (timeout != kNoTimeout) {
        left = std::max(std::chrono::milliseconds(0),
                        timeout - std::chrono::duration_cast<std::chrono::milliseconds>(
                                      std::chrono::steady_clock::now() - start));
      }
      done = completer_->waitReleased(seq_, left, this) ? 1 : 0;
    }
    if (!done) {
      C10_THROW_ERROR(DistBackendError, what_ + ": wait timed out after " +
                                            std::to_string(timeout.count()) +
                                            " ms (the operation is still in progress)");
    }
  }
  complete(); // no-op if done; else finishes here rather than waiting for the completer
  // The completion thread may have won the race and be about to mark the future; callers
  // expect getFuture() to hold the value once wait() returns. (Future::wait does not run
  // callbacks, so this can't block on user code.)
  future_->wait();
  if (exception_) {
    std::rethrow_exception(exception_);
  }
  return true;
}

c10::intrusive_ptr<c10::ivalue::Future> MooncakeWork::getFuture() { return future_; }

// ---------------------------------------------------------------- MooncakeBackend

namespace {
// Releases the GIL for its scope if this thread holds it: shutdown joins the completion thread,
// which may be waiting for the GIL to run a Python future callback.
class WithoutGil {
public:
  WithoutGil() {
    if (Py_IsInitialized() && PyGILState_Check()) {
      saved_ = PyEval_SaveThread();
    }
  }
  ~WithoutGil() {
    if (saved_ != nullptr) {
      PyEval_RestoreThread(saved_);
    }
  }
  WithoutGil(const WithoutGil &) = delete;
  WithoutGil &operator=(const WithoutGil &) = delete;

private:
  PyThreadState *saved_ = nullptr;
};
} // namespace

MooncakeBackend::MooncakeBackend(const c10::intrusive_ptr<c10d::Store> &store, int rank, int size,
                                 std::chrono::milliseconds timeout, const std::string &groupName)
    : c10d::Backend(rank, size), name_(groupName), options_(c10::make_intrusive<Options>(timeout)) {
  init();
  options_->group_name = groupName;
  // Keys of a previous communicator under the same group name (destroy_process_group() then
  // init_process_group() on the same store) must not be read as this one's: each creation takes
  // its own namespace. All ranks of creation k count before any rank can start creation k+1
  // (rendezvous needs every rank's address), so the count identifies the creation.
  int64_t gen = (store->add("mooncake/creations", 1) - 1) / size;
  store_ = c10::make_intrusive<c10d::PrefixStore>("mooncake/" + std::to_string(gen), store);
  mcStore_.ctx = store_.get();
  mcStore_.set = storeSet;
  mcStore_.get = storeGet;
  mcStore_.add = storeAdd;

  mc_config_t cfg;
  mc_config_init(&cfg);
  cfg.timeout_ms = toMs(timeout);
  cfg.name = name_.c_str();
  mc_status_t st = mc_comm_create(&cfg, &mcStore_, rank, size, &comm_);
  if (st != MC_OK) {
    const char *why = mc_last_error();
    C10_THROW_ERROR(DistBackendError, what("init") + " failed: " +
                                          (why != nullptr && *why ? why : mc_status_str(st)));
  }
  completer_ = std::make_shared<Completer>();
  completer_->start();
}

MooncakeBackend::MooncakeBackend(const MooncakeBackend &parent, mc_comm_t *comm)
    : c10d::Backend(mc_comm_rank(comm), mc_comm_size(comm)), store_(parent.store_),
      name_(parent.name_), options_(c10::make_intrusive<Options>(parent.options_->timeout)),
      comm_(comm) {
  init();
  options_->group_name = parent.options_->group_name;
  completer_ = std::make_shared<Completer>();
  completer_->start();
}

MooncakeBackend::~MooncakeBackend() { shutdown(); }

c10::intrusive_ptr<c10d::Backend>
MooncakeBackend::split(const c10::intrusive_ptr<c10d::Store> &store, const std::vector<int> &ranks,
                       const c10::intrusive_ptr<c10d::Backend::Options> &opts) {
  auto it = std::find(ranks.begin(), ranks.end(), rank_);
  if (it == ranks.end()) {
    return nullptr; // not a member of the new group
  }
  const int rank = static_cast<int>(it - ranks.begin());
  const auto timeout = opts ? opts->timeout : options_->timeout;
  const std::string name = opts && !opts->group_name.empty() ? opts->group_name : name_ + ":split";
  WithoutGil noGil; // rendezvous blocks on the other members
  return c10::make_intrusive<MooncakeBackend>(store, rank, static_cast<int>(ranks.size()), timeout,
                                              name);
}

std::string MooncakeBackend::what(const char *op) const {
  std::string s = "mooncake rank " + std::to_string(rank_) + "/" + std::to_string(size_);
  if (!name_.empty()) {
    s += " (group " + name_ + ")";
  }
  return s + ": " + op;
}

void MooncakeBackend::setTimeout(std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> g(commMu_);
  TORCH_CHECK(comm_ != nullptr, what("setTimeout"), ": backend has been shut down");
  mc_status_t st = mc_comm_set_timeout(comm_, toMs(timeout));
  TORCH_CHECK_VALUE(st == MC_OK, what("setTimeout"), ": ", mc_status_str(st));
  options_->timeout = timeout;
}

void MooncakeBackend::abort() {
  std::lock_guard<std::mutex> g(commMu_);
  if (comm_ != nullptr) {
    mc_comm_abort(comm_); // local and immediate: pending works fail with MC_ERR_REVOKED
  }
}

void MooncakeBackend::shutdown() {
  WithoutGil noGil;
  mc_comm_t *comm = nullptr;
  {
    std::lock_guard<std::mutex> g(commMu_);
    std::swap(comm, comm_);
  }
  if (comm != nullptr) {
    mc_comm_destroy(comm); // fails what is pending; their callbacks enqueue into completer_
  }
  if (completer_) {
    completer_->stop(); // completes the queued works, then ends the thread
  }
}

c10::intrusive_ptr<c10d::Backend>
MooncakeBackend::shrink(const std::vector<int64_t> &ranks_to_exclude, int /*shrink_flags*/,
                        const c10::intrusive_ptr<c10d::Backend::Options> & /*opts_override*/) {
  WithoutGil noGil; // the agreement waits on peers
  std::vector<int> exclude(ranks_to_exclude.begin(), ranks_to_exclude.end());
  mc_comm_t *comm = nullptr;
  mc_comm_t *shrunk = nullptr;
  {
    std::lock_guard<std::mutex> g(commMu_);
    comm = comm_;
  }
  TORCH_CHECK(comm != nullptr, what("shrink"), ": backend has been shut down");
  // Pending operations on the parent cannot complete with a member gone: fail them now.
  mc_status_t st = mc_comm_shrink(comm, exclude.data(), static_cast<int>(exclude.size()), &shrunk);
  if (st != MC_OK) {
    const char *why = mc_last_error();
    C10_THROW_ERROR(DistBackendError, what("shrink") + " failed: " +
                                          (why != nullptr && *why ? why : mc_status_str(st)));
  }
  auto child = c10::make_intrusive<MooncakeBackend>(*this, shrunk);
  std::map<int, int> parentOf; // origin rank -> rank in this group
  for (int r = 0; r < size_; r++) {
    parentOf[mc_comm_origin_rank(comm, r)] = r;
  }
  for (int r = 0; r < mc_comm_size(shrunk); r++) {
    child->parentRanks_.push_back(parentOf[mc_comm_origin_rank(shrunk, r)]);
  }
  return child;
}

std::vector<int64_t> MooncakeBackend::failedRanks() {
  std::lock_guard<std::mutex> g(commMu_);
  TORCH_CHECK(comm_ != nullptr, what("failed_ranks"), ": backend has been shut down");
  std::vector<int> ranks(static_cast<size_t>(size_));
  int n = mc_comm_failed_ranks(comm_, ranks.data(), size_);
  return {ranks.begin(), ranks.begin() + std::min(n, size_)};
}

std::string MooncakeBackend::transport() {
  std::lock_guard<std::mutex> g(commMu_);
  TORCH_CHECK(comm_ != nullptr, what("transport"), ": backend has been shut down");
  const char *t = mc_comm_transport(comm_);
  return t != nullptr ? t : "";
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::launch(const char *op, c10d::OpType type, Pending &&p,
                        const std::function<mc_status_t(mc_comm_t *, mc_request_t **)> &issue) {
  auto work = c10::make_intrusive<MooncakeWork>(rank_, type, nullptr, what(op),
                                                std::move(p.outputs), completer_);
  work->keepAlive_ = std::move(p.keepAlive);
  work->copyBack_ = std::move(p.copyBack);

  std::lock_guard<std::mutex> g(commMu_);
  if (comm_ == nullptr) {
    C10_THROW_ERROR(DistBackendError, work->what_ + ": backend has been shut down");
  }
  mc_request_t *req = nullptr;
  mc_status_t st = issue(comm_, &req);
  if (st != MC_OK || req == nullptr) {
    std::string why = req != nullptr ? mc_request_error(req) : mc_last_error();
    if (req != nullptr) {
      mc_request_free(req);
    }
    C10_THROW_ERROR(DistBackendError,
                    work->what_ + " could not start: " + (why.empty() ? mc_status_str(st) : why));
  }
  work->req_ = req;
  work->seq_ = nextSeq_++; // under commMu_: the order ops reach the engine
  work->nested_ = Completer::onCompleterThread();
  // The callback owns one reference until it runs (possibly right here, if already done).
  MooncakeWork *ref = c10::intrusive_ptr<MooncakeWork>(work).release();
  if (mc_request_on_complete(req, &MooncakeWork::onEngineComplete, ref) != MC_OK) {
    c10::intrusive_ptr<MooncakeWork>::reclaim(ref); // never registered (invalid arguments)
    mc_wait(req, -1);
    completer_->push(work->seq_, work);
  }
  return work;
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::allreduce(std::vector<at::Tensor> &tensors,
                                                          const c10d::AllreduceOptions &opts) {
  const std::string w = what("allreduce");
  checkSingle(tensors, w);
  const at::Tensor &t = tensors[0];
  mc_dtype_t dt = checkTensor(t, w);
  Reduction red = toReduction(opts.reduceOp, t, dt, w);
  Pending p;
  p.outputs = tensors;
  at::Tensor buf = p.buffer(t, true, true);
  size_t n = count(buf);
  void *ptr = buf.data_ptr();
  return launch(
      "allreduce", c10d::OpType::ALLREDUCE, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return issueAllreduce(c, ptr, ptr, n, dt, red, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::allreduce_coalesced(std::vector<at::Tensor> &tensors,
                                     const c10d::AllreduceCoalescedOptions &opts) {
  const std::string w = what("allreduce_coalesced");
  TORCH_CHECK_VALUE(!tensors.empty(), w, ": needs at least one tensor");
  mc_dtype_t dt = checkTensor(tensors[0], w);
  for (const auto &t : tensors) {
    checkTensor(t, w);
    TORCH_CHECK_TYPE(t.scalar_type() == tensors[0].scalar_type(), w,
                     ": all tensors must have the same dtype, got ", tensors[0].scalar_type(),
                     " and ", t.scalar_type());
  }
  Reduction red = toReduction(opts.reduceOp, tensors[0], dt, w);
  // One engine call over a flat copy; each tensor gets its slice back on success.
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const auto &t : tensors) {
    flat.push_back(t.reshape({-1}));
  }
  Pending p;
  p.outputs = tensors;
  at::Tensor buf = at::cat(flat);
  p.keepAlive.push_back(buf);
  int64_t off = 0;
  for (const auto &t : tensors) {
    p.copyBack.emplace_back(buf.narrow(0, off, t.numel()).view(t.sizes()), t);
    off += t.numel();
  }
  size_t n = count(buf);
  void *ptr = buf.data_ptr();
  return launch(
      "allreduce_coalesced", c10d::OpType::ALLREDUCE_COALESCED, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return issueAllreduce(c, ptr, ptr, n, dt, red, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::allgather(std::vector<std::vector<at::Tensor>> &outputs,
                           std::vector<at::Tensor> &inputs,
                           const c10d::AllgatherOptions & /*opts*/) {
  const std::string w = what("allgather");
  checkSingle(inputs, w);
  TORCH_CHECK_VALUE(outputs.size() == 1, w, ": expects one output list per input, got ",
                    outputs.size());
  const at::Tensor &in = inputs[0];
  mc_dtype_t dt = checkTensor(in, w);
  auto &outs = outputs[0];
  TORCH_CHECK_VALUE(outs.size() == static_cast<size_t>(size_), w, ": output list has ", outs.size(),
                    " tensors, expected one per rank (", size_, ")");
  for (size_t r = 0; r < outs.size(); ++r) {
    checkTensor(outs[r], w);
    TORCH_CHECK_TYPE(outs[r].scalar_type() == in.scalar_type(), w, ": output ", r, " has dtype ",
                     outs[r].scalar_type(), ", input has ", in.scalar_type());
    TORCH_CHECK_VALUE(outs[r].numel() == in.numel(), w, ": output ", r, " has ", outs[r].numel(),
                      " elements, input has ", in.numel());
  }
  // The engine gathers into one flat buffer; copy each rank's block into its output tensor.
  Pending p;
  p.outputs = outs;
  at::Tensor src = p.buffer(in, true, false);
  at::Tensor flat = at::empty({static_cast<int64_t>(size_) * in.numel()}, in.options());
  p.keepAlive.push_back(flat);
  for (int r = 0; r < size_; ++r) {
    p.copyBack.emplace_back(flat.narrow(0, r * in.numel(), in.numel()).view(outs[r].sizes()),
                            outs[r]);
  }
  size_t n = count(in);
  const void *inPtr = src.data_ptr();
  void *outPtr = flat.data_ptr();
  return launch(
      "allgather", c10d::OpType::ALLGATHER, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_allgather(c, inPtr, outPtr, n, dt, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::_allgather_base(at::Tensor &output, at::Tensor &input,
                                 const c10d::AllgatherOptions & /*opts*/) {
  const std::string w = what("all_gather_into_tensor");
  mc_dtype_t dt = checkTensor(input, w);
  checkTensor(output, w);
  TORCH_CHECK_TYPE(output.scalar_type() == input.scalar_type(), w, ": output dtype ",
                   output.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(output.numel() == input.numel() * size_, w, ": output has ", output.numel(),
                    " elements, expected world size (", size_, ") x input (", input.numel(), ")");
  Pending p;
  p.outputs = {output};
  at::Tensor src = p.buffer(input, true, false);
  at::Tensor dst = p.buffer(output, false, true);
  size_t n = count(input);
  const void *inPtr = src.data_ptr();
  void *outPtr = dst.data_ptr();
  return launch(
      "all_gather_into_tensor", c10d::OpType::_ALLGATHER_BASE, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_allgather(c, inPtr, outPtr, n, dt, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::_reduce_scatter_base(at::Tensor &output, at::Tensor &input,
                                      const c10d::ReduceScatterOptions &opts) {
  const std::string w = what("reduce_scatter_tensor");
  mc_dtype_t dt = checkTensor(input, w);
  checkTensor(output, w);
  TORCH_CHECK_TYPE(output.scalar_type() == input.scalar_type(), w, ": output dtype ",
                   output.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(input.numel() == output.numel() * size_, w, ": input has ", input.numel(),
                    " elements, expected world size (", size_, ") x output (", output.numel(), ")");
  Reduction red = toReduction(opts.reduceOp, input, dt, w);
  Pending p;
  p.outputs = {output};
  // The engine reads every input block while it writes the output: an output that aliases
  // the input (in-place use) reduces from a copy.
  bool aliases = output.numel() > 0 && input.numel() > 0 && output.is_alias_of(input);
  at::Tensor src = aliases ? p.buffer(input.clone(), true, false) : p.buffer(input, true, false);
  at::Tensor dst = p.buffer(output, false, true);
  size_t n = count(output);
  const void *inPtr = src.data_ptr();
  void *outPtr = dst.data_ptr();
  return launch("reduce_scatter_tensor", c10d::OpType::_REDUCE_SCATTER_BASE, std::move(p),
                [=](mc_comm_t *c, mc_request_t **r) {
                  return issueReduceScatter(c, inPtr, outPtr, n, dt, red, r);
                });
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::broadcast(std::vector<at::Tensor> &tensors,
                                                          const c10d::BroadcastOptions &opts) {
  const std::string w = what("broadcast");
  checkSingle(tensors, w);
  TORCH_CHECK_VALUE(opts.rootTensor == 0, w, ": rootTensor must be 0, got ", opts.rootTensor);
  TORCH_CHECK_VALUE(opts.rootRank >= 0 && opts.rootRank < size_, w, ": root rank ", opts.rootRank,
                    " is out of range [0, ", size_, ")");
  const at::Tensor &t = tensors[0];
  mc_dtype_t dt = checkTensor(t, w);
  Pending p;
  p.outputs = tensors;
  at::Tensor buf = p.buffer(t, rank_ == opts.rootRank, rank_ != opts.rootRank);
  size_t n = count(buf);
  void *ptr = buf.data_ptr();
  int root = static_cast<int>(opts.rootRank);
  return launch(
      "broadcast", c10d::OpType::BROADCAST, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_broadcast(c, ptr, n, dt, root, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>> &outputs,
                                     std::vector<at::Tensor> &inputs,
                                     const c10d::AllgatherOptions & /*opts*/) {
  const std::string w = what("allgather_coalesced");
  TORCH_CHECK_VALUE(!inputs.empty(), w, ": needs at least one input tensor");
  TORCH_CHECK_VALUE(outputs.size() == static_cast<size_t>(size_), w, ": has ", outputs.size(),
                    " output lists, expected one per rank (", size_, ")");
  mc_dtype_t dt = checkTensor(inputs[0], w);
  checkAll(inputs, inputs[0], -1, w, "input");
  for (size_t r = 0; r < outputs.size(); ++r) {
    TORCH_CHECK_VALUE(outputs[r].size() == inputs.size(), w, ": output list ", r, " has ",
                      outputs[r].size(), " tensors, expected one per input (", inputs.size(), ")");
    for (size_t i = 0; i < inputs.size(); ++i) {
      checkTensor(outputs[r][i], w);
      TORCH_CHECK_TYPE(outputs[r][i].scalar_type() == inputs[i].scalar_type(), w, ": output ", r,
                       "[", i, "] has dtype ", outputs[r][i].scalar_type(), ", input ", i, " has ",
                       inputs[i].scalar_type());
      TORCH_CHECK_VALUE(outputs[r][i].numel() == inputs[i].numel(), w, ": output ", r, "[", i,
                        "] has ", outputs[r][i].numel(), " elements, input ", i, " has ",
                        inputs[i].numel());
    }
  }
  // One allgather of the inputs laid end to end; rank r's row holds its copy of every input.
  Pending p;
  for (const auto &list : outputs) {
    p.outputs.insert(p.outputs.end(), list.begin(), list.end());
  }
  at::Tensor in = flatCat(inputs);
  const int64_t total = in.numel();
  at::Tensor flat = at::empty({size_ * total}, in.options());
  p.keepAlive.insert(p.keepAlive.end(), {in, flat});
  for (int r = 0; r < size_; ++r) {
    int64_t off = r * total;
    for (size_t i = 0; i < inputs.size(); ++i) {
      at::Tensor &out = outputs[r][i];
      p.copyBack.emplace_back(flat.narrow(0, off, out.numel()).view(out.sizes()), out);
      off += out.numel();
    }
  }
  const void *inPtr = in.data_ptr();
  void *outPtr = flat.data_ptr();
  size_t n = static_cast<size_t>(total);
  return launch(
      "allgather_coalesced", c10d::OpType::ALLGATHER_COALESCED, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_allgather(c, inPtr, outPtr, n, dt, r); });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor> &outputs,
                                                 std::vector<at::Tensor> &inputs,
                                                 const c10d::AllgatherOptions & /*opts*/) {
  const std::string w = what("allgather_into_tensor_coalesced");
  TORCH_CHECK_VALUE(!inputs.empty() && outputs.size() == inputs.size(), w,
                    ": needs as many outputs (", outputs.size(), ") as inputs (", inputs.size(),
                    "), at least one");
  mc_dtype_t dt = checkTensor(inputs[0], w);
  checkAll(inputs, inputs[0], -1, w, "input");
  checkAll(outputs, inputs[0], -1, w, "output");
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK_VALUE(outputs[i].numel() == inputs[i].numel() * size_, w, ": output ", i, " has ",
                      outputs[i].numel(), " elements, expected world size (", size_, ") x input (",
                      inputs[i].numel(), ")");
  }
  // One allgather of all inputs laid end to end; rank r's row of the result holds its slice of
  // every input, copied into each output's block r.
  Pending p;
  p.outputs = outputs;
  at::Tensor in = flatCat(inputs);
  const int64_t total = in.numel();
  at::Tensor flat = at::empty({size_ * total}, in.options());
  p.keepAlive.insert(p.keepAlive.end(), {in, flat});
  std::vector<std::pair<at::Tensor, at::Tensor>> last; // temps into non-contiguous outputs
  int64_t off = 0;
  for (auto &out : outputs) {
    const int64_t n = out.numel() / size_;
    at::Tensor target = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
    p.copyBack.emplace_back(flat.view({size_, total}).narrow(1, off, n), target.view({size_, n}));
    if (!out.is_contiguous()) {
      p.keepAlive.push_back(target);
      last.emplace_back(target, out);
    }
    off += n;
  }
  p.copyBack.insert(p.copyBack.end(), last.begin(), last.end());
  const void *inPtr = in.data_ptr();
  void *outPtr = flat.data_ptr();
  size_t n = static_cast<size_t>(total);
  return launch(
      "allgather_into_tensor_coalesced", c10d::OpType::COALESCED, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_allgather(c, inPtr, outPtr, n, dt, r); });
}

// Reduce-scatter whose input is `blocks` laid end to end (rank-major: every rank's part of the
// input is `perRank` elements) and whose result is split over `outputs` in order.
c10::intrusive_ptr<c10d::Work> MooncakeBackend::reduceScatterFlat(const char *op, c10d::OpType type,
                                                                  std::vector<at::Tensor> outputs,
                                                                  std::vector<at::Tensor> blocks,
                                                                  size_t perRank,
                                                                  const c10d::ReduceOp &reduceOp) {
  const std::string w = what(op);
  mc_dtype_t dt = checkTensor(outputs[0], w);
  Reduction red = toReduction(reduceOp, outputs[0], dt, w);
  Pending p;
  p.outputs = outputs;
  at::Tensor in = flatCat(blocks);
  at::Tensor flat = at::empty({static_cast<int64_t>(perRank)}, in.options());
  p.keepAlive.insert(p.keepAlive.end(), {in, flat});
  int64_t off = 0;
  for (auto &out : outputs) {
    p.copyBack.emplace_back(flat.narrow(0, off, out.numel()).view(out.sizes()), out);
    off += out.numel();
  }
  const void *inPtr = in.data_ptr();
  void *outPtr = flat.data_ptr();
  return launch(op, type, std::move(p), [=](mc_comm_t *c, mc_request_t **r) {
    return issueReduceScatter(c, inPtr, outPtr, perRank, dt, red, r);
  });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::reduce_scatter(std::vector<at::Tensor> &outputs,
                                std::vector<std::vector<at::Tensor>> &inputs,
                                const c10d::ReduceScatterOptions &opts) {
  const std::string w = what("reduce_scatter");
  checkSingle(outputs, w);
  TORCH_CHECK_VALUE(inputs.size() == 1, w, ": expects one input list, got ", inputs.size());
  checkTensor(outputs[0], w);
  TORCH_CHECK_VALUE(inputs[0].size() == static_cast<size_t>(size_), w, ": input list has ",
                    inputs[0].size(), " tensors, expected one per rank (", size_, ")");
  checkAll(inputs[0], outputs[0], outputs[0].numel(), w, "input");
  return reduceScatterFlat("reduce_scatter", c10d::OpType::REDUCE_SCATTER, outputs, inputs[0],
                           count(outputs[0]), opts.reduceOp);
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::reduce_scatter_tensor_coalesced(std::vector<at::Tensor> &outputs,
                                                 std::vector<at::Tensor> &inputs,
                                                 const c10d::ReduceScatterOptions &opts) {
  const std::string w = what("reduce_scatter_tensor_coalesced");
  TORCH_CHECK_VALUE(!inputs.empty() && outputs.size() == inputs.size(), w,
                    ": needs as many outputs (", outputs.size(), ") as inputs (", inputs.size(),
                    "), at least one");
  checkTensor(outputs[0], w);
  checkAll(outputs, outputs[0], -1, w, "output");
  checkAll(inputs, outputs[0], -1, w, "input");
  size_t perRank = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK_VALUE(inputs[i].numel() == outputs[i].numel() * size_, w, ": input ", i, " has ",
                      inputs[i].numel(), " elements, expected world size (", size_, ") x output (",
                      outputs[i].numel(), ")");
    perRank += count(outputs[i]);
  }
  // Rank-major input: rank r's part is block r of every input, in order.
  std::vector<at::Tensor> blocks;
  for (int r = 0; r < size_; ++r) {
    for (size_t i = 0; i < inputs.size(); ++i) {
      const int64_t n = outputs[i].numel();
      blocks.push_back(inputs[i].reshape({-1}).narrow(0, r * n, n));
    }
  }
  return reduceScatterFlat("reduce_scatter_tensor_coalesced", c10d::OpType::COALESCED, outputs,
                           blocks, perRank, opts.reduceOp);
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::reduce(std::vector<at::Tensor> &tensors,
                                                       const c10d::ReduceOptions &opts) {
  const std::string w = what("reduce");
  checkSingle(tensors, w);
  TORCH_CHECK_VALUE(opts.rootTensor == 0, w, ": rootTensor must be 0, got ", opts.rootTensor);
  checkRoot(opts.rootRank, size_, w);
  const at::Tensor &t = tensors[0];
  mc_dtype_t dt = checkTensor(t, w);
  Reduction red = toReduction(opts.reduceOp, t, dt, w);
  const int root = static_cast<int>(opts.rootRank);
  const bool isRoot = rank_ == root;
  Pending p;
  p.outputs = tensors;
  at::Tensor buf = p.buffer(t, true, isRoot); // only the root's tensor changes
  size_t n = count(buf);
  void *ptr = buf.data_ptr();
  return launch("reduce", c10d::OpType::REDUCE, std::move(p), [=](mc_comm_t *c, mc_request_t **r) {
    return issueReduce(c, ptr, isRoot ? ptr : nullptr, n, dt, red, root, r);
  });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::gather(std::vector<std::vector<at::Tensor>> &outputs,
                        std::vector<at::Tensor> &inputs, const c10d::GatherOptions &opts) {
  const std::string w = what("gather");
  checkSingle(inputs, w);
  checkRoot(opts.rootRank, size_, w);
  const at::Tensor &in = inputs[0];
  mc_dtype_t dt = checkTensor(in, w);
  const int root = static_cast<int>(opts.rootRank);
  Pending p;
  at::Tensor src = p.buffer(in, true, false);
  void *outPtr = nullptr;
  if (rank_ == root) {
    TORCH_CHECK_VALUE(outputs.size() == 1 && outputs[0].size() == static_cast<size_t>(size_), w,
                      ": the root needs one output list with one tensor per rank (", size_, ")");
    checkAll(outputs[0], in, in.numel(), w, "output");
    p.outputs = outputs[0];
    at::Tensor flat = at::empty({static_cast<int64_t>(size_) * in.numel()}, in.options());
    p.keepAlive.push_back(flat);
    for (int r = 0; r < size_; ++r) {
      p.copyBack.emplace_back(
          flat.narrow(0, r * in.numel(), in.numel()).view(outputs[0][r].sizes()), outputs[0][r]);
    }
    outPtr = flat.data_ptr();
  } else {
    TORCH_CHECK_VALUE(outputs.empty() || (outputs.size() == 1 && outputs[0].empty()), w,
                      ": only the root (rank ", root, ") takes output tensors");
  }
  size_t n = count(in);
  const void *inPtr = src.data_ptr();
  return launch("gather", c10d::OpType::GATHER, std::move(p), [=](mc_comm_t *c, mc_request_t **r) {
    return mc_gather(c, inPtr, outPtr, n, dt, root, r);
  });
}

c10::intrusive_ptr<c10d::Work>
MooncakeBackend::scatter(std::vector<at::Tensor> &outputs,
                         std::vector<std::vector<at::Tensor>> &inputs,
                         const c10d::ScatterOptions &opts) {
  const std::string w = what("scatter");
  checkSingle(outputs, w);
  checkRoot(opts.rootRank, size_, w);
  const at::Tensor &out = outputs[0];
  mc_dtype_t dt = checkTensor(out, w);
  const int root = static_cast<int>(opts.rootRank);
  Pending p;
  p.outputs = outputs;
  const void *inPtr = nullptr;
  if (rank_ == root) {
    TORCH_CHECK_VALUE(inputs.size() == 1 && inputs[0].size() == static_cast<size_t>(size_), w,
                      ": the root needs one input list with one tensor per rank (", size_, ")");
    checkAll(inputs[0], out, out.numel(), w, "input");
    at::Tensor flat = flatCat(inputs[0]);
    p.keepAlive.push_back(flat);
    inPtr = flat.data_ptr();
  } else {
    TORCH_CHECK_VALUE(inputs.empty() || (inputs.size() == 1 && inputs[0].empty()), w,
                      ": only the root (rank ", root, ") takes input tensors");
  }
  at::Tensor dst = p.buffer(out, false, true);
  size_t n = count(out);
  void *outPtr = dst.data_ptr();
  return launch(
      "scatter", c10d::OpType::SCATTER, std::move(p),
      [=](mc_comm_t *c, mc_request_t **r) { return mc_scatter(c, inPtr, outPtr, n, dt, root, r); });
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::alltoall(std::vector<at::Tensor> &outputs,
                                                         std::vector<at::Tensor> &inputs,
                                                         const c10d::AllToAllOptions & /*opts*/) {
  const std::string w = what("alltoall");
  TORCH_CHECK_VALUE(inputs.size() == static_cast<size_t>(size_) && outputs.size() == inputs.size(),
                    w, ": needs one input and one output tensor per rank (", size_, "), got ",
                    inputs.size(), " and ", outputs.size());
  mc_dtype_t dt = checkTensor(inputs[0], w);
  checkAll(inputs, inputs[0], -1, w, "input");
  checkAll(outputs, inputs[0], -1, w, "output");
  // Tensors may differ in size per peer: one alltoallv over flat copies.
  std::vector<size_t> sendCounts(size_), sendDispls(size_), recvCounts(size_), recvDispls(size_);
  size_t sendTotal = 0, recvTotal = 0;
  for (int j = 0; j < size_; ++j) {
    sendCounts[j] = count(inputs[j]), sendDispls[j] = sendTotal, sendTotal += sendCounts[j];
    recvCounts[j] = count(outputs[j]), recvDispls[j] = recvTotal, recvTotal += recvCounts[j];
  }
  Pending p;
  p.outputs = outputs;
  at::Tensor in = flatCat(inputs);
  at::Tensor flat = at::empty({static_cast<int64_t>(recvTotal)}, in.options());
  p.keepAlive.insert(p.keepAlive.end(), {in, flat});
  for (int j = 0; j < size_; ++j) {
    p.copyBack.emplace_back(
        flat.narrow(0, static_cast<int64_t>(recvDispls[j]), static_cast<int64_t>(recvCounts[j]))
            .view(outputs[j].sizes()),
        outputs[j]);
  }
  const void *inPtr = in.data_ptr();
  void *outPtr = flat.data_ptr();
  return launch("alltoall", c10d::OpType::ALLTOALL, std::move(p),
                [=](mc_comm_t *c, mc_request_t **r) {
                  return mc_alltoallv(c, inPtr, sendCounts.data(), sendDispls.data(), outPtr,
                                      recvCounts.data(), recvDispls.data(), dt, r);
                });
}

namespace {
// Element counts and displacements of an all_to_all_single split along dim 0; empty splits
// mean equal parts.
void splitCounts(const at::Tensor &t, const std::vector<int64_t> &splits, int size,
                 const std::string &what, const char *role, std::vector<size_t> &counts,
                 std::vector<size_t> &displs) {
  const int64_t rows = t.dim() == 0 ? 1 : t.size(0);
  int64_t rowElems = 1; // elements per dim-0 row, also when dim 0 is empty
  for (int64_t d = 1; d < t.dim(); ++d) {
    rowElems *= t.size(d);
  }
  std::vector<int64_t> s = splits;
  if (s.empty()) {
    TORCH_CHECK_VALUE(rows % size == 0, what, ": ", role, " dim 0 (", rows,
                      ") is not divisible by the world size (", size,
                      ") and no split sizes were given");
    s.assign(size, rows / size);
  }
  TORCH_CHECK_VALUE(s.size() == static_cast<size_t>(size), what, ": ", role, " split sizes have ",
                    s.size(), " entries, expected one per rank (", size, ")");
  int64_t sum = 0;
  counts.resize(size), displs.resize(size);
  for (int j = 0; j < size; ++j) {
    TORCH_CHECK_VALUE(s[j] >= 0, what, ": ", role, " split size ", j, " is negative (", s[j], ")");
    counts[j] = static_cast<size_t>(s[j] * rowElems);
    displs[j] = static_cast<size_t>(sum * rowElems);
    sum += s[j];
  }
  TORCH_CHECK_VALUE(sum == rows, what, ": ", role, " split sizes add up to ", sum,
                    ", but dim 0 has ", rows);
}
} // namespace

c10::intrusive_ptr<c10d::Work> MooncakeBackend::alltoall_base(
    at::Tensor &output, at::Tensor &input, std::vector<int64_t> &outputSplitSizes,
    std::vector<int64_t> &inputSplitSizes, const c10d::AllToAllOptions & /*opts*/) {
  const std::string w = what("all_to_all_single");
  mc_dtype_t dt = checkTensor(input, w);
  checkTensor(output, w);
  TORCH_CHECK_TYPE(output.scalar_type() == input.scalar_type(), w, ": output dtype ",
                   output.scalar_type(), " differs from input dtype ", input.scalar_type());
  std::vector<size_t> sendCounts, sendDispls, recvCounts, recvDispls;
  splitCounts(input, inputSplitSizes, size_, w, "input", sendCounts, sendDispls);
  splitCounts(output, outputSplitSizes, size_, w, "output", recvCounts, recvDispls);
  Pending p;
  p.outputs = {output};
  bool aliases = output.numel() > 0 && input.numel() > 0 && output.is_alias_of(input);
  at::Tensor src = aliases ? p.buffer(input.clone(), true, false) : p.buffer(input, true, false);
  at::Tensor dst = p.buffer(output, false, true);
  const void *inPtr = src.data_ptr();
  void *outPtr = dst.data_ptr();
  return launch("all_to_all_single", c10d::OpType::ALLTOALL_BASE, std::move(p),
                [=](mc_comm_t *c, mc_request_t **r) {
                  return mc_alltoallv(c, inPtr, sendCounts.data(), sendDispls.data(), outPtr,
                                      recvCounts.data(), recvDispls.data(), dt, r);
                });
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::barrier(const c10d::BarrierOptions & /*opts*/) {
  return launch("barrier", c10d::OpType::BARRIER, Pending{},
                [](mc_comm_t *c, mc_request_t **r) { return mc_barrier(c, r); });
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::pointToPoint(const char *op, c10d::OpType type,
                                                             std::vector<at::Tensor> &tensors,
                                                             int peer, int tag) {
  const std::string w = what(op);
  checkSingle(tensors, w);
  const at::Tensor &t = tensors[0];
  mc_dtype_t dt = checkTensor(t, w);
  TORCH_CHECK_VALUE(tag >= 0 && tag <= MC_TAG_MAX, w, ": tag ", tag, " is out of range [0, ",
                    MC_TAG_MAX, "]");
  TORCH_CHECK_VALUE(peer == MC_ANY_SOURCE || (peer >= 0 && peer < size_), w, ": peer rank ", peer,
                    " is out of range [0, ", size_, ")");
  const bool isSend = type == c10d::OpType::SEND;
  Pending p;
  p.outputs = tensors;
  at::Tensor buf = p.buffer(t, isSend, !isSend);
  size_t n = count(buf);
  void *ptr = buf.data_ptr();
  return launch(op, type, std::move(p), [=](mc_comm_t *c, mc_request_t **r) {
    return isSend ? mc_send(c, ptr, n, dt, peer, tag, r) : mc_recv(c, ptr, n, dt, peer, tag, r);
  });
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::send(std::vector<at::Tensor> &tensors, int dstRank,
                                                     int tag) {
  TORCH_CHECK_VALUE(dstRank != MC_ANY_SOURCE, what("send"), ": invalid destination rank -1");
  return pointToPoint("send", c10d::OpType::SEND, tensors, dstRank, tag);
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::recv(std::vector<at::Tensor> &tensors, int srcRank,
                                                     int tag) {
  TORCH_CHECK_VALUE(srcRank != MC_ANY_SOURCE, what("recv"), ": invalid source rank -1");
  return pointToPoint("recv", c10d::OpType::RECV, tensors, srcRank, tag);
}

c10::intrusive_ptr<c10d::Work> MooncakeBackend::recvAnysource(std::vector<at::Tensor> &tensors,
                                                              int tag) {
  return pointToPoint("recv", c10d::OpType::RECVANYSOURCE, tensors, MC_ANY_SOURCE, tag);
}

} // namespace mooncake
