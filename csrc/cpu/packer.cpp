// Token-budget packing of whole documents, best-fit decreasing: the same algorithm, and the same
// result, as moca/data/packing.py (its reference and fallback), for corpora of millions of
// documents. Built by setup.py as the extension moca.data._packer (pybind11).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

std::vector<std::vector<int64_t>> pack(const std::vector<int64_t>& costs, int64_t budget) {
  if (budget < 1) throw std::invalid_argument("budget must be at least 1, got " + std::to_string(budget));
  const int64_t n = static_cast<int64_t>(costs.size());
  for (int64_t i = 0; i < n; ++i) {
    if (costs[i] < 1 || costs[i] > budget) {
      throw std::invalid_argument("document " + std::to_string(i) + " costs " + std::to_string(costs[i]) +
                                  " tokens; costs must be in [1, budget=" + std::to_string(budget) +
                                  "] (truncate long documents first)");
    }
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  std::vector<std::vector<int64_t>> bins;
  std::set<std::pair<int64_t, int64_t>> room;  // (room left, bin index)
  for (int64_t i : order) {
    auto it = room.lower_bound({costs[i], -1});
    int64_t left, bin;
    if (it == room.end()) {
      bins.push_back({i});
      bin = static_cast<int64_t>(bins.size()) - 1;
      left = budget - costs[i];
    } else {
      left = it->first - costs[i];
      bin = it->second;
      room.erase(it);
      bins[bin].push_back(i);
    }
    if (left > 0) room.insert({left, bin});
  }
  for (auto& b : bins) std::sort(b.begin(), b.end());
  std::sort(bins.begin(), bins.end(), [](const auto& a, const auto& b) { return a.front() < b.front(); });
  return bins;
}

}  // namespace

PYBIND11_MODULE(_packer, m) {
  m.doc() = "Best-fit-decreasing packing of whole documents under a token budget (see moca/data/packing.py).";
  m.def("pack", &pack, pybind11::arg("costs"), pybind11::arg("budget"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
