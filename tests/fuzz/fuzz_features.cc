// libFuzzer target: featurizing arbitrary task text, tags and manifests (any bytes, not
// only UTF-8) must stay in bounds and produce normalised vectors.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cortex/features.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string s(reinterpret_cast<const char*>(data), size);
  size_t cut = s.find('\0');
  std::string text = s.substr(0, cut);
  std::string rest = cut == std::string::npos ? "" : s.substr(cut + 1);
  cortex::FeatureHasher h(18);
  cortex::SparseVector v = h.Task(text, {{"k", rest}});
  double norm = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v.idx[i] >= (1u << 18) || (i && v.idx[i] <= v.idx[i - 1])) std::abort();
    norm += static_cast<double>(v.val[i]) * v.val[i];
  }
  if (v.size() && std::fabs(norm - 1.0) > 1e-3) std::abort();
  cortex::SparseVector m = h.Manifest({text, rest, {rest, text}, {text}});
  (void)cortex::Dot(v, m);
  return 0;
}
