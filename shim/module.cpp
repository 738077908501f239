// mooncake._C: exposes the backend class and its factory to Python. Registration with
// torch.distributed happens in python/mooncake/__init__.py.
#include <torch/csrc/utils/pybind.h>

#include <pybind11/chrono.h>

#include "mooncake_backend.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  // c10d::Backend and c10d::Store must already be bound (by torch) for the class hierarchy and
  // the store argument to resolve.
  py::module_::import("torch.distributed");

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
