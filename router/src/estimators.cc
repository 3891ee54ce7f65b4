#include "cortex/estimators.h"

#include <algorithm>
#include <cmath>

namespace cortex {

PolicyEstimate MeanCi(const std::vector<double>& v) {
  PolicyEstimate e;
  if (v.empty()) return e;
  double s = 0, ss = 0;
  for (double x : v) s += x;
  e.value = s / v.size();
  for (double x : v) ss += (x - e.value) * (x - e.value);
  if (v.size() > 1) e.ci = 1.96 * std::sqrt(ss / (v.size() - 1) / v.size());
  return e;
}

double DoublyRobust(double q_pick, bool pick_is_logged, double reward, double q_logged,
                    double propensity) {
  return q_pick + (pick_is_logged ? (reward - q_logged) / propensity : 0.0);
}

double LoggedPickValue(double q_pick, bool pick_is_logged, double reward, double propensity,
                       double clip) {
  return pick_is_logged ? q_pick + std::min(1.0 / propensity, clip) * (reward - q_pick) : q_pick;
}

}  // namespace cortex
