// Linked when the build has no CUDA toolkit: the GPU backend reports why it is absent.
#include "cortex/gating.h"

namespace cortex {

bool CudaBuilt() { return false; }

Result<std::unique_ptr<GatingEngine>> MakeCudaEngine() {
  return Status::FailedPrecondition(
      "this build has no CUDA backend (toolkit not found at build time)");
}

Result<GemmReport> CudaGemmProbe(int, int, int) {
  return Status::FailedPrecondition("this build has no CUDA backend");
}

}  // namespace cortex
