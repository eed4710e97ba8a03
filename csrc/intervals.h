// The length of a union of time intervals, in bounded memory: how long a copy engine was
// busy when copies from several rings overlap in time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

namespace fastcap {

class IntervalUnion {
 public:
  // Disjoint intervals held at most; beyond it the earliest are folded into a total.
  static constexpr size_t kMaxHeld = 256;

  // Adds [start, end); an empty or inverted interval adds nothing. Overlapping and
  // touching intervals merge.
  void add(double start, double end) {
    // The folded intervals are assumed final: anything before their end was counted.
    start = std::max(start, done_end_);
    if (!(end > start)) return;  // also drops NaN
    // held_ is sorted and disjoint, so its ends are sorted too: the first interval that
    // can touch [start, end) is the first ending at or after start.
    auto first = std::lower_bound(held_.begin(), held_.end(), start,
                                  [](const std::pair<double, double>& a, double s) { return a.second < s; });
    auto last = first;
    while (last != held_.end() && last->first <= end) {
      start = std::min(start, last->first);
      end = std::max(end, last->second);
      ++last;
    }
    first = held_.erase(first, last);
    held_.insert(first, {start, end});
    if (held_.size() > kMaxHeld) {
      done_ += held_.front().second - held_.front().first;
      done_end_ = held_.front().second;
      held_.erase(held_.begin());
    }
  }

  double seconds() const {
    double total = done_;
    for (const auto& [s, e] : held_) total += e - s;
    return total;
  }

  size_t held() const { return held_.size(); }

 private:
  std::vector<std::pair<double, double>> held_;  // sorted by start, disjoint
  double done_ = 0.0;  // total length of the folded intervals
  double done_end_ = -std::numeric_limits<double>::infinity();
};

}  // namespace fastcap
