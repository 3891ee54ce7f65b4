// The exploration policy, a reduction of its own (as Vowpal Wabbit's): it turns a
// decision's scores into the probability of trying each candidate, and a sampler draws
// from them. Both are pure functions of their inputs (the sampler, of its generator), so
// the propensity a decision logs is exact and testable against known answers.
#pragma once

#include <cstddef>
#include <random>
#include <vector>

namespace cortex {

struct ExploreOptions {
  double rate = 0.05;  // router.exploration: the rate when the model is 50% sure
  // The rate follows the model's doubt about its greedy pick: rate times 2 (1 - confidence),
  // within [floor, 2] times the rate (never none: a new expert or a drifting stream still
  // gets tried).
  double floor = 0.1;
  double temperature = 0.1;  // of the softmax over scores when exploring
  double uniform = 0.1;      // share of the exploration spread uniformly
};

struct Exploration {
  double epsilon = 0;          // the chance of exploring at all
  std::vector<double> spread;  // when exploring: each candidate's chance (sums to 1)
  // The chance candidate `j` is chosen; candidate 0 is the greedy pick.
  double Probability(size_t j) const;
};

// `scores`: the candidates' scores in selection order (greedy first); `confidence`: the
// model's estimate of the greedy pick's reward. Uniform plus a softmax of the scores, so
// every candidate keeps a known, non-zero chance while plausible runners-up are tried more
// often than hopeless ones.
Exploration Explore(const std::vector<double>& scores, double confidence,
                    const ExploreOptions& options);

// Which candidate: one uniform draw against epsilon, then (exploring) one from the spread.
// Draws nothing when epsilon is 0.
size_t Sample(const Exploration& e, std::mt19937_64* rng, bool* explored);

}  // namespace cortex
