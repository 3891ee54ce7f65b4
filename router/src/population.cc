#include "cortex/population.h"

#include <algorithm>

namespace cortex {

std::vector<Variant> PopulationVariants(int population) {
  static const Variant kAll[] = {
      {"fresh", false, 1.0f},
      {"warm", true, 1.0f},
      {"fresh, half steps", false, 0.5f},
      {"fresh, double steps", false, 2.0f},
  };
  const int n = std::clamp(population, 1, static_cast<int>(std::size(kAll)));
  return std::vector<Variant>(kAll, kAll + n);
}

TrainOptions VariantOptions(const TrainOptions& base, const Variant& v) {
  TrainOptions o = base;
  o.lr *= v.lr_scale;
  o.lr_wide *= v.lr_scale;
  return o;
}

size_t ChooseVariant(const std::vector<VariantFit>& fits) {
  size_t best = 0;
  bool found = false;
  for (size_t i = 0; i < fits.size(); ++i) {
    if (!fits[i].eligible) continue;
    if (!found || fits[i].loss < fits[best].loss) best = i, found = true;
  }
  return best;
}

}  // namespace cortex
