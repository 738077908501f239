// mooncake._C: exposes the backend class and its factory to Python. Registration with
// torch.distributed happens in python/mooncake/__init__.py.
#include <torch/csrc/utils/pybind.h>

#include <pybind11/chrono.h>

#include "mooncake_backend.hpp"

#include <dlfcn.h>

#include <csignal>
#include <cstring>

namespace py = pybind11;

namespace {
// libfabric (Debian's build) links libinfinipath (PSM), whose load-time constructor installs
// handlers for SIGTERM, SIGSEGV, SIGBUS, SIGILL and SIGABRT that call exit(). exit() is not
// async-signal-safe: a SIGTERM (torchrun stopping its workers, a test harness ending ranks)
// reaches every thread, several run exit handlers at once and the process deadlocks; a crash
// becomes exit(1) without a core. Give those signals back their previous meaning: the
// default action, or Python's own handler where Python installed one (SIGINT).
void dropInfinipathSignalHandlers() {
  for (int sig : {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}) {
    struct sigaction sa {};
    if (sigaction(sig, nullptr, &sa) != 0) {
      continue;
    }
    void *h = (sa.sa_flags & SA_SIGINFO) != 0 ? reinterpret_cast<void *>(sa.sa_sigaction)
                                              : reinterpret_cast<void *>(sa.sa_handler);
    Dl_info info{};
    if (h == nullptr || dladdr(h, &info) == 0 || info.dli_fname == nullptr ||
        std::strstr(info.dli_fname, "libinfinipath") == nullptr) {
      continue;
    }
    std::signal(sig, SIG_DFL);
    try { // Python's own handler back, if it had one (signal.signal: main thread only)
      py::module_ signal = py::module_::import("signal");
      py::object prev = signal.attr("getsignal")(sig);
      if (!prev.is_none() && !prev.equal(signal.attr("SIG_DFL"))) {
        signal.attr("signal")(sig, prev);
      }
    } catch (const py::error_already_set &) {
    }
  }
}
} // namespace

PYBIND11_MODULE(_C, m) {
  // c10d::Backend and c10d::Store must already be bound (by torch) for the class hierarchy and
  // the store argument to resolve.
  py::module_::import("torch.distributed");
  dropInfinipathSignalHandlers();

  py::class_<mooncake::MooncakeBackend, c10d::Backend,
             c10::intrusive_ptr<mooncake::MooncakeBackend>>(m, "MooncakeBackend")
      .def("transport", &mooncake::MooncakeBackend::transport,
           "Transport provider the communicator uses (e.g. \"shm\", \"tcp\").")
      .def("failed_ranks", &mooncake::MooncakeBackend::failedRanks,
           "Ranks of this group known to have failed.")
      .def("parent_ranks", &mooncake::MooncakeBackend::parentRanks,
           "For a shrunk backend: each rank's rank in the group it was shrunk from.")
      .def(
          "shrink_agreed",
          [](mooncake::MooncakeBackend &self) {
            return c10::static_intrusive_pointer_cast<mooncake::MooncakeBackend>(
                self.shrink({}, 0, nullptr));
          },
          "Shrinks to the survivors the ranks agree on (collective over the survivors).",
          py::call_guard<py::gil_scoped_release>());

  m.def(
      "_create_backend",
      [](const c10::intrusive_ptr<c10d::Store> &store, int rank, int size,
         std::chrono::milliseconds timeout, const std::string &groupName) {
        return c10::make_intrusive<mooncake::MooncakeBackend>(store, rank, size, timeout,
                                                              groupName);
      },
      py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
      py::arg("group_name") = "",
      // Rendezvous blocks on the store and on peers; other Python threads must keep running.
      py::call_guard<py::gil_scoped_release>());

  m.def("version",
        [] { return std::to_string(MC_VERSION_MAJOR) + "." + std::to_string(MC_VERSION_MINOR); });
}
