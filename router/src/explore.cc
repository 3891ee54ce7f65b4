#include "cortex/explore.h"

#include <algorithm>
#include <cmath>

namespace cortex {

double Exploration::Probability(size_t j) const {
  return epsilon * spread[j] + (j == 0 ? 1.0 - epsilon : 0.0);
}

Exploration Explore(const std::vector<double>& scores, double confidence, const ExploreOptions& o) {
  Exploration e;
  const size_t E = scores.size();
  if (E == 0) return e;
  const double doubt = std::clamp(2 * (1 - confidence), o.floor, 2.0);
  e.epsilon = std::min(1.0, o.rate * doubt);
  e.spread.resize(E);
  double mx = -1e300, z = 0;
  for (double s : scores) mx = std::max(mx, s);
  for (size_t j = 0; j < E; ++j) z += (e.spread[j] = std::exp((scores[j] - mx) / o.temperature));
  for (size_t j = 0; j < E; ++j)
    e.spread[j] = o.uniform / static_cast<double>(E) + (1 - o.uniform) * e.spread[j] / z;
  return e;
}

size_t Sample(const Exploration& e, std::mt19937_64* rng, bool* explored) {
  *explored = false;
  if (e.epsilon <= 0) return 0;
  if (std::uniform_real_distribution<double>(0, 1)(*rng) >= e.epsilon) return 0;
  *explored = true;
  return std::discrete_distribution<size_t>(e.spread.begin(), e.spread.end())(*rng);
}

}  // namespace cortex
