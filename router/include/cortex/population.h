// Population training: a retrain fits several candidates (`training.population`), each a
// variant of the batch trainer, and keeps the one whose held-out log loss is lowest on the
// newest tenth of the training rows (Learner::Fit's validation slice, which no variant's
// probe passes learned from). Only that one goes to the gate, whose holdout none of them
// has seen: choosing among several never looks at the decisions the promotion is judged on.
#pragma once

#include <string>
#include <vector>

#include "cortex/gating.h"

namespace cortex {

// One way to train a candidate.
struct Variant {
  std::string name;
  bool warm = false;     // starts from the live version's saved weights, not fresh ones
  float lr_scale = 1.0;  // both step sizes of the batch trainer, scaled
};

// The first `population` variants, in this order: fresh (the trainer as configured), warm
// from the live version, fresh with half the step sizes, fresh with twice them. At most 4.
std::vector<Variant> PopulationVariants(int population);

// The options a variant trains with.
TrainOptions VariantOptions(const TrainOptions& base, const Variant& v);

// A fitted variant's result as the choice reads it.
struct VariantFit {
  bool eligible = false;  // fitted and judged on a validation slice it never learned from
  double loss = 0;        // that slice's weighted log loss after the passes chosen
};

// The index of the eligible variant with the lowest loss (the first of equals), else 0
// (the configured trainer: nothing to judge the others by).
size_t ChooseVariant(const std::vector<VariantFit>& fits);

}  // namespace cortex
