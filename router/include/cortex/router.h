// Turns a batch of tasks into decisions: model score + rule score, selection-only load
// and health biases, forced rules, and epsilon-exploration whose propensity is recorded.
#pragma once

#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cortex/features.h"
#include "cortex/rules.h"
#include "cortex/scorer.h"
#include "cortex/types.h"

namespace cortex {

struct RouterOptions {
  double exploration = 0.05;
  double load_bias = 0.2;
  uint64_t seed = 1;
  double health_bias = 0.5;
};

struct RouteRequest {
  std::string text;
  Tags tags;
};

struct ExpertSlot {
  ExpertProfile profile;
  double load = 0;    // in-flight / capacity, in [0,1]; only biases selection
  double health = 0;  // 0 healthy .. 1 restarting after a crash; only biases selection
};

class Router {
 public:
  Router(RouterOptions options, RuleSet rules, std::unique_ptr<Scorer> scorer,
         FeatureHasher hasher = FeatureHasher());

  // One decision per request. With `explore` false (dry runs) the greedy choice is
  // reported with the propensity it would have had. Unavailable if `experts` is empty.
  Status Route(const std::vector<RouteRequest>& batch, const std::vector<ExpertSlot>& experts,
               bool explore, double now, std::vector<Decision>* out);

  const FeatureHasher& hasher() const { return hasher_; }
  const RuleSet& rules() const { return rules_; }
  const RouterOptions& options() const { return options_; }
  std::string model_version() const { return scorer_->version(); }
  std::string backend() const { return scorer_->backend(); }

 private:
  RouterOptions options_;
  RuleSet rules_;
  std::unique_ptr<Scorer> scorer_;
  FeatureHasher hasher_;
  std::mutex score_mu_;  // scorers (a GPU one especially) run one batch at a time
  std::mutex rng_mu_;
  std::mt19937_64 rng_;
};

}  // namespace cortex
