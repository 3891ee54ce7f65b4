// CUDA engine: the dense layers through cuBLAS, sparse gathers/scatters and Adagrad in small
// kernels. Every sum runs in a fixed order (no atomics), so training is deterministic; the
// scatter order comes from the same host-side StepPlan the CPU engine uses.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "gating_plan.h"

namespace cortex {
namespace {

#define CX_CUDA(call)                                                                         \
  do {                                                                                        \
    cudaError_t e_ = (call);                                                                  \
    if (e_ != cudaSuccess)                                                                    \
      return Status::Internal(std::string("CUDA: ") + #call + ": " + cudaGetErrorString(e_)); \
  } while (0)
#define CX_CUBLAS(call)                                                                            \
  do {                                                                                             \
    cublasStatus_t s_ = (call);                                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                               \
      return Status::Internal(std::string("cuBLAS: ") + #call + ": " + cublasGetStatusString(s_)); \
  } while (0)

// Grows-only device buffer.
template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t cap = 0;
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  Status Fit(size_t n) {
    if (n <= cap) return Status::OK();
    if (p) cudaFree(p);
    p = nullptr;
    cap = 0;
    CX_CUDA(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    cap = n;
    return Status::OK();
  }
  Status Put(const std::vector<T>& v) {
    CORTEX_RETURN_IF_ERROR(Fit(v.size()));
    if (!v.empty()) CX_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return Status::OK();
  }
  Status Get(std::vector<T>* v, size_t n) const {
    v->resize(n);
    if (n) CX_CUDA(cudaMemcpy(v->data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return Status::OK();
  }
};

__device__ __forceinline__ uint64_t SplitMixD(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Must match GatingModel::WideIndex (FeatureMix, then WideSlot).
__device__ __forceinline__ uint32_t WideIndexD(uint32_t i, uint64_t key, int wide_bits) {
  return static_cast<uint32_t>(((SplitMixD(i) ^ key) * 0x9E3779B97F4A7C15ULL) >> (64 - wide_bits));
}

__device__ __forceinline__ float SigmoidD(float z) { return 1.0f / (1.0f + expf(-z)); }

// h[b][c] = tanh(b1[c] + sum_j val[j] * emb[idx[j]][c]); one block per row, a thread per c.
__global__ void GatherTanh(const int* off, const uint32_t* idx, const float* val, const float* emb,
                           const float* b1, int H, uint32_t mask, float* out) {
  const int b = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float s = b1[c];
    for (int j = off[b]; j < off[b + 1]; ++j)
      s += val[j] * emb[static_cast<size_t>(idx[j] & mask) * H + c];
    out[static_cast<size_t>(b) * H + c] = tanhf(s);
  }
}

// Scores: out[b][e] = sigmoid(Z + bias + prior terms + wide part), in place on Z.
__global__ void FinishScores(int B, int E, const int* off, const uint32_t* idx, const float* val,
                             const float* wide, int wide_bits, uint32_t mask, const uint64_t* keys,
                             const float* bias, const float* prior, float pw, float pb, float* Z) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= B * E) return;
  const int b = t / E, e = t % E;
  float z = Z[t] + bias[e] + pb + pw * prior[t];
  for (int j = off[b]; j < off[b + 1]; ++j)
    z += val[j] * wide[WideIndexD(idx[j] & mask, keys[e], wide_bits)];
  Z[t] = SigmoidD(z);
}

// Training: dz per row, written into dZ (n x E, zero elsewhere).
__global__ void RowGrad(int n, int E, const int* x_off, const uint32_t* x_wide, const float* x_val,
                        const float* wide, const int* col, const float* prior, const float* reward,
                        const float* weight, const float* bias, float pw, float pb, const float* Z,
                        float* dZ, float* dz) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= n) return;
  const int e = col[k];
  float z = Z[k * E + e] + bias[e] + pb + pw * prior[k];
  for (int j = x_off[k]; j < x_off[k + 1]; ++j) z += x_val[j] * wide[x_wide[j]];
  const float d = weight[k] * (SigmoidD(z) - reward[k]) / static_cast<float>(n);
  dZ[k * E + e] = d;
  dz[k] = d;
}

__device__ __forceinline__ void AdagradD(float* theta, float* acc, float g, float lr) {
  *acc += g * g;
  *theta -= lr * g / sqrtf(*acc);
}

// Scalars and per-expert biases: one thread, sequential sums (n is a minibatch).
__global__ void UpdateSmall(int n, int E, int H, const int* col, const float* dz,
                            const float* prior, float lr, float* bias, float* acc_heads, float* pw,
                            float* pb, float* acc_pw, float* acc_pb, float* g_bias_out) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  float g_pw = 0, g_pb = 0;
  for (int e = 0; e < E; ++e) g_bias_out[e] = 0;
  for (int k = 0; k < n; ++k) {
    g_bias_out[col[k]] += dz[k];
    g_pw += dz[k] * prior[k];
    g_pb += dz[k];
  }
  // The CPU engine updates the head weights before the bias; the order does not interact.
  for (int e = 0; e < E; ++e)
    if (g_bias_out[e] != 0.0f) AdagradD(&bias[e], &acc_heads[e * (H + 1) + H], g_bias_out[e], lr);
  AdagradD(pw, acc_pw, g_pw, lr);
  AdagradD(pb, acc_pb, g_pb, lr);
}

__global__ void UpdateHeads(int E, int H, const float* dU, const float* g_bias, float lr, float* U,
                            float* acc_heads) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= E * H) return;
  const int e = t / H, c = t % H;
  if (g_bias[e] == 0.0f) return;
  AdagradD(&U[t], &acc_heads[e * (H + 1) + c], dU[t], lr);
}

// dH *= 1 - h^2, then b1's gradient (sequential over rows for determinism).
__global__ void TanhBackB1(int n, int H, const float* Hm, float* dH, float lr, float* b1,
                           float* acc_b1) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= H) return;
  float g = 0;
  for (int k = 0; k < n; ++k) {
    const size_t i = static_cast<size_t>(k) * H + c;
    dH[i] *= 1.0f - Hm[i] * Hm[i];
    g += dH[i];
  }
  AdagradD(&b1[c], &acc_b1[c], g, lr);
}

// One block per unique Emb row, a thread per column; contributions in plan order.
__global__ void UpdateEmb(int H, const uint32_t* rows, const int* off, const int* pos,
                          const float* val, const float* dH, float lr, float* emb, float* acc) {
  const int u = blockIdx.x;
  for (int c = threadIdx.x; c < H; c += blockDim.x) {
    float g = 0;
    for (int s = off[u]; s < off[u + 1]; ++s) g += val[s] * dH[static_cast<size_t>(pos[s]) * H + c];
    const size_t i = static_cast<size_t>(rows[u]) * H + c;
    AdagradD(&emb[i], &acc[i], g, lr);
  }
}

__global__ void UpdateWide(int U, const uint32_t* idx, const int* off, const int* pos,
                           const float* val, const float* dz, float lr, float* wide, float* acc) {
  const int u = blockIdx.x * blockDim.x + threadIdx.x;
  if (u >= U) return;
  float g = 0;
  for (int s = off[u]; s < off[u + 1]; ++s) g += val[s] * dz[pos[s]];
  AdagradD(&wide[idx[u]], &acc[idx[u]], g, lr);
}

// Lays several host arrays out in one buffer (256-byte aligned), for a single copy.
struct Packer {
  struct Part {
    const void* p;
    size_t bytes, at;
  };
  std::vector<Part> parts;
  size_t size = 0;
  template <typename T>
  size_t Add(const std::vector<T>& v) {
    const size_t at = size;
    parts.push_back({v.data(), v.size() * sizeof(T), at});
    size = (at + v.size() * sizeof(T) + 255) / 256 * 256;
    return at;
  }
  void Write(char* dst) const {
    for (const auto& p : parts)
      if (p.bytes) std::memcpy(dst + p.at, p.p, p.bytes);
  }
};

int Blocks(size_t n, int t) { return static_cast<int>((n + t - 1) / t); }

class CudaEngine : public GatingEngine {
 public:
  CudaEngine(int device, std::string name) : device_(device), name_(std::move(name)) {}
  ~CudaEngine() override {
    if (handle_) cublasDestroy(handle_);
    if (pinned_) cudaFreeHost(pinned_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  Status Init() {
    CX_CUDA(cudaSetDevice(device_));
    CX_CUBLAS(cublasCreate(&handle_));
    // A blocking stream: it stays ordered with the default-stream work of Train.
    CX_CUDA(cudaStreamCreate(&stream_));
    CX_CUBLAS(cublasSetStream(handle_, stream_));
    // Pedantic math: no TF32 shortcuts, so results stay within 1e-4 of the CPU engine.
    CX_CUBLAS(cublasSetMathMode(handle_, CUBLAS_PEDANTIC_MATH));
    return Status::OK();
  }
  std::string backend() const override { return name_; }

  Status Score(const GatingModel& m, const SparseBatch& x, const std::vector<std::string>& experts,
               const std::vector<float>& prior, std::vector<float>* out) override {
    const int B = x.rows(), E = static_cast<int>(experts.size()), H = m.hidden();
    out->assign(static_cast<size_t>(B) * E, 0.0f);
    if (B == 0 || E == 0) return Status::OK();
    CX_CUDA(cudaSetDevice(device_));
    CORTEX_RETURN_IF_ERROR(Upload(m));
    const internal::HeadMatrix hm = internal::Heads(m, experts);
    // One pinned staging buffer, one copy each way, all on one stream: a single decision
    // costs a few launches instead of eight synchronous copies.
    Packer pk;
    const size_t o_off = pk.Add(x.offsets), o_idx = pk.Add(x.idx), o_val = pk.Add(x.val),
                 o_U = pk.Add(hm.U), o_bias = pk.Add(hm.bias), o_keys = pk.Add(hm.keys),
                 o_prior = pk.Add(prior);
    CORTEX_RETURN_IF_ERROR(
        FitPinned(std::max(pk.size, static_cast<size_t>(B) * E * sizeof(float))));
    CORTEX_RETURN_IF_ERROR(pack_.Fit(pk.size));
    pk.Write(pinned_);
    CX_CUDA(cudaMemcpyAsync(pack_.p, pinned_, pk.size, cudaMemcpyHostToDevice, stream_));
    auto at = [&](size_t o) { return pack_.p + o; };
    const int* d_off = reinterpret_cast<const int*>(at(o_off));
    const uint32_t* d_idx = reinterpret_cast<const uint32_t*>(at(o_idx));
    const float* d_val = reinterpret_cast<const float*>(at(o_val));
    const float* d_U = reinterpret_cast<const float*>(at(o_U));
    CORTEX_RETURN_IF_ERROR(H_.Fit(static_cast<size_t>(B) * H));
    CORTEX_RETURN_IF_ERROR(Z_.Fit(static_cast<size_t>(B) * E));
    const uint32_t mask = static_cast<uint32_t>(m.rows() - 1);
    GatherTanh<<<B, std::min(H, 256), 0, stream_>>>(d_off, d_idx, d_val, emb_.p, b1_.p, H, mask,
                                                    H_.p);
    CX_CUDA(cudaGetLastError());
    const float one = 1.0f, zero = 0.0f;
    // Row-major Z[B x E] = Hm[B x H] * U^T, i.e. column-major Z^T = U^T(col) * Hm^T(col).
    CX_CUBLAS(cublasSgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, E, B, H, &one, d_U, H, H_.p, H, &zero,
                          Z_.p, E));
    FinishScores<<<Blocks(static_cast<size_t>(B) * E, 256), 256, 0, stream_>>>(
        B, E, d_off, d_idx, d_val, wide_.p, m.shape().wide_bits, mask,
        reinterpret_cast<const uint64_t*>(at(o_keys)), reinterpret_cast<const float*>(at(o_bias)),
        reinterpret_cast<const float*>(at(o_prior)), m.prior_w, m.prior_b, Z_.p);
    CX_CUDA(cudaGetLastError());
    const size_t bytes = static_cast<size_t>(B) * E * sizeof(float);
    CX_CUDA(cudaMemcpyAsync(pinned_, Z_.p, bytes, cudaMemcpyDeviceToHost, stream_));
    CX_CUDA(cudaStreamSynchronize(stream_));
    std::memcpy(out->data(), pinned_, bytes);
    return Status::OK();
  }

  Status Train(GatingModel* m, const TrainSet& data, const TrainOptions& opt) override {
    const int E = static_cast<int>(data.experts.size()), H = m->hidden();
    if (data.rows.empty() || E == 0) return Status::OK();
    CX_CUDA(cudaSetDevice(device_));
    std::vector<uint64_t> keys(E);
    std::vector<float> U(static_cast<size_t>(E) * H), bias(E),
        accH(static_cast<size_t>(E) * (H + 1));
    for (int e = 0; e < E; ++e) {
      keys[e] = GatingModel::ExpertKey(data.experts[e]);
      ExpertHead* h = m->MutableHead(data.experts[e]);
      std::copy(h->w.begin(), h->w.end(), U.begin() + static_cast<size_t>(e) * H);
      bias[e] = h->bias;
      const auto& g = m->g_heads[data.experts[e]];
      std::copy(g.begin(), g.end(), accH.begin() + static_cast<size_t>(e) * (H + 1));
    }
    // The whole model and its optimiser state stay on the device for the run.
    loaded_ = nullptr;
    CORTEX_RETURN_IF_ERROR(emb_.Put(m->emb));
    CORTEX_RETURN_IF_ERROR(b1_.Put(m->b1));
    CORTEX_RETURN_IF_ERROR(wide_.Put(m->wide));
    CORTEX_RETURN_IF_ERROR(g_emb_.Put(m->g_emb));
    CORTEX_RETURN_IF_ERROR(g_b1_.Put(m->g_b1));
    CORTEX_RETURN_IF_ERROR(g_wide_.Put(m->g_wide));
    CORTEX_RETURN_IF_ERROR(U_.Put(U));
    CORTEX_RETURN_IF_ERROR(bias_.Put(bias));
    CORTEX_RETURN_IF_ERROR(accH_.Put(accH));
    std::vector<float> scal = {m->prior_w, m->prior_b, m->g_prior_w, m->g_prior_b};
    CORTEX_RETURN_IF_ERROR(scal_.Put(scal));
    CORTEX_RETURN_IF_ERROR(gbias_.Fit(E));
    CORTEX_RETURN_IF_ERROR(dU_.Fit(static_cast<size_t>(E) * H));
    const float one = 1.0f, zero = 0.0f;
    const uint32_t mask = static_cast<uint32_t>(m->rows() - 1);
    std::vector<float> prior, reward, weight;
    CORTEX_RETURN_IF_ERROR(internal::ForEachMinibatch(
        *m, data, opt, keys, [&](const internal::StepPlan& p, int n) -> Status {
          prior.clear();
          reward.clear();
          weight.clear();
          for (int r : p.rows) {
            prior.push_back(data.rows[r].prior);
            reward.push_back(data.rows[r].reward);
            weight.push_back(data.rows[r].weight);
          }
          CORTEX_RETURN_IF_ERROR(off_.Put(p.x_off));
          CORTEX_RETURN_IF_ERROR(idx_.Put(p.x_emb));
          CORTEX_RETURN_IF_ERROR(xw_.Put(p.x_wide));
          CORTEX_RETURN_IF_ERROR(val_.Put(p.x_val));
          CORTEX_RETURN_IF_ERROR(col_.Put(p.col));
          CORTEX_RETURN_IF_ERROR(prior_.Put(prior));
          CORTEX_RETURN_IF_ERROR(reward_.Put(reward));
          CORTEX_RETURN_IF_ERROR(weight_.Put(weight));
          CORTEX_RETURN_IF_ERROR(er_.Put(p.emb_rows));
          CORTEX_RETURN_IF_ERROR(eo_.Put(p.emb_off));
          CORTEX_RETURN_IF_ERROR(ep_.Put(p.emb_pos));
          CORTEX_RETURN_IF_ERROR(ev_.Put(p.emb_val));
          CORTEX_RETURN_IF_ERROR(wi_.Put(p.wide_idx));
          CORTEX_RETURN_IF_ERROR(wo_.Put(p.wide_off));
          CORTEX_RETURN_IF_ERROR(wp_.Put(p.wide_pos));
          CORTEX_RETURN_IF_ERROR(wv_.Put(p.wide_val));
          CORTEX_RETURN_IF_ERROR(H_.Fit(static_cast<size_t>(n) * H));
          CORTEX_RETURN_IF_ERROR(dH_.Fit(static_cast<size_t>(n) * H));
          CORTEX_RETURN_IF_ERROR(Z_.Fit(static_cast<size_t>(n) * E));
          CORTEX_RETURN_IF_ERROR(dZ_.Fit(static_cast<size_t>(n) * E));
          CORTEX_RETURN_IF_ERROR(dz_.Fit(n));
          CX_CUDA(cudaMemset(dZ_.p, 0, static_cast<size_t>(n) * E * sizeof(float)));
          float pw_pb[2];
          CX_CUDA(cudaMemcpy(pw_pb, scal_.p, 2 * sizeof(float), cudaMemcpyDeviceToHost));

          GatherTanh<<<n, std::min(H, 256)>>>(off_.p, idx_.p, val_.p, emb_.p, b1_.p, H, mask, H_.p);
          CX_CUBLAS(cublasSgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, E, n, H, &one, U_.p, H, H_.p, H,
                                &zero, Z_.p, E));
          RowGrad<<<Blocks(n, 128), 128>>>(n, E, off_.p, xw_.p, val_.p, wide_.p, col_.p, prior_.p,
                                           reward_.p, weight_.p, bias_.p, pw_pb[0], pw_pb[1], Z_.p,
                                           dZ_.p, dz_.p);
          // Row-major dU[E x H] = dZ^T * Hm  and  dH[n x H] = dZ * U.
          CX_CUBLAS(cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_T, H, E, n, &one, H_.p, H, dZ_.p, E,
                                &zero, dU_.p, H));
          CX_CUBLAS(cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, H, n, E, &one, U_.p, H, dZ_.p, E,
                                &zero, dH_.p, H));
          UpdateSmall<<<1, 1>>>(n, E, H, col_.p, dz_.p, prior_.p, opt.lr, bias_.p, accH_.p, scal_.p,
                                scal_.p + 1, scal_.p + 2, scal_.p + 3, gbias_.p);
          UpdateHeads<<<Blocks(static_cast<size_t>(E) * H, 256), 256>>>(E, H, dU_.p, gbias_.p,
                                                                        opt.lr, U_.p, accH_.p);
          TanhBackB1<<<Blocks(H, 64), 64>>>(n, H, H_.p, dH_.p, opt.lr, b1_.p, g_b1_.p);
          if (!p.emb_rows.empty())
            UpdateEmb<<<static_cast<int>(p.emb_rows.size()), std::min(H, 256)>>>(
                H, er_.p, eo_.p, ep_.p, ev_.p, dH_.p, opt.lr, emb_.p, g_emb_.p);
          if (!p.wide_idx.empty())
            UpdateWide<<<Blocks(p.wide_idx.size(), 128), 128>>>(static_cast<int>(p.wide_idx.size()),
                                                                wi_.p, wo_.p, wp_.p, wv_.p, dz_.p,
                                                                opt.lr_wide, wide_.p, g_wide_.p);
          CX_CUDA(cudaGetLastError());
          return Status::OK();
        }));
    // Back to the host model.
    CORTEX_RETURN_IF_ERROR(emb_.Get(&m->emb, m->emb.size()));
    CORTEX_RETURN_IF_ERROR(b1_.Get(&m->b1, m->b1.size()));
    CORTEX_RETURN_IF_ERROR(wide_.Get(&m->wide, m->wide.size()));
    CORTEX_RETURN_IF_ERROR(g_emb_.Get(&m->g_emb, m->g_emb.size()));
    CORTEX_RETURN_IF_ERROR(g_b1_.Get(&m->g_b1, m->g_b1.size()));
    CORTEX_RETURN_IF_ERROR(g_wide_.Get(&m->g_wide, m->g_wide.size()));
    CORTEX_RETURN_IF_ERROR(U_.Get(&U, U.size()));
    CORTEX_RETURN_IF_ERROR(bias_.Get(&bias, bias.size()));
    CORTEX_RETURN_IF_ERROR(accH_.Get(&accH, accH.size()));
    CORTEX_RETURN_IF_ERROR(scal_.Get(&scal, 4));
    m->prior_w = scal[0];
    m->prior_b = scal[1];
    m->g_prior_w = scal[2];
    m->g_prior_b = scal[3];
    for (int e = 0; e < E; ++e) {
      ExpertHead* h = m->MutableHead(data.experts[e]);
      std::copy(U.begin() + static_cast<size_t>(e) * H, U.begin() + static_cast<size_t>(e + 1) * H,
                h->w.begin());
      h->bias = bias[e];
      auto& g = m->g_heads[data.experts[e]];
      std::copy(accH.begin() + static_cast<size_t>(e) * (H + 1),
                accH.begin() + static_cast<size_t>(e + 1) * (H + 1), g.begin());
    }
    m->stamp = GatingModel::NextStamp();
    return Status::OK();
  }

 private:
  Status FitPinned(size_t n) {
    if (n <= pinned_cap_) return Status::OK();
    if (pinned_) cudaFreeHost(pinned_);
    pinned_ = nullptr;
    pinned_cap_ = 0;
    CX_CUDA(cudaMallocHost(&pinned_, n));
    pinned_cap_ = n;
    return Status::OK();
  }

  // Scoring keeps a device copy of the model, refreshed when the model changes.
  Status Upload(const GatingModel& m) {
    if (loaded_ == &m && loaded_stamp_ == m.stamp) return Status::OK();
    CORTEX_RETURN_IF_ERROR(emb_.Put(m.emb));
    CORTEX_RETURN_IF_ERROR(b1_.Put(m.b1));
    CORTEX_RETURN_IF_ERROR(wide_.Put(m.wide));
    loaded_ = &m;
    loaded_stamp_ = m.stamp;
    return Status::OK();
  }

  int device_;
  std::string name_;
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  char* pinned_ = nullptr;
  size_t pinned_cap_ = 0;
  DevBuf<char> pack_;
  const GatingModel* loaded_ = nullptr;
  uint64_t loaded_stamp_ = 0;
  DevBuf<float> emb_, b1_, wide_, g_emb_, g_b1_, g_wide_, U_, bias_, accH_, scal_, gbias_, dU_;
  DevBuf<float> H_, dH_, Z_, dZ_, dz_, val_, prior_, reward_, weight_, ev_, wv_;
  DevBuf<int> off_, col_, eo_, ep_, wo_, wp_;
  DevBuf<uint32_t> idx_, xw_, er_, wi_;
  DevBuf<uint64_t> keys_;
};

}  // namespace

bool CudaBuilt() { return true; }

Result<GemmReport> CudaGemmProbe(int B, int H, int E) {
  cublasHandle_t h;
  CX_CUBLAS(cublasCreate(&h));
  CX_CUBLAS(cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH));
  auto timed = [&](int m, int n, int k, int reps, double* secs) -> Status {
    DevBuf<float> a, b, c;
    CORTEX_RETURN_IF_ERROR(a.Fit(static_cast<size_t>(m) * k));
    CORTEX_RETURN_IF_ERROR(b.Fit(static_cast<size_t>(k) * n));
    CORTEX_RETURN_IF_ERROR(c.Fit(static_cast<size_t>(m) * n));
    CX_CUDA(cudaMemset(a.p, 0, a.cap * sizeof(float)));
    CX_CUDA(cudaMemset(b.p, 0, b.cap * sizeof(float)));
    const float one = 1.0f, zero = 0.0f;
    CX_CUBLAS(
        cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, a.p, k, b.p, k, &zero, c.p, m));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaEventRecord(e0);
    for (int r = 0; r < reps; ++r)
      CX_CUBLAS(
          cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, a.p, k, b.p, k, &zero, c.p, m));
    cudaEventRecord(e1);
    CX_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    *secs = ms / 1000.0 / reps;
    return Status::OK();
  };
  GemmReport r;
  double ours = 0, peak = 0;
  Status st = timed(E, B, H, 200, &ours);  // the scoring product, as Score issues it
  if (st.ok()) st = timed(8192, 8192, 8192, 5, &peak);
  cublasDestroy(h);
  CORTEX_RETURN_IF_ERROR(st);
  r.shape = std::to_string(B) + "x" + std::to_string(H) + " * " + std::to_string(H) + "x" +
            std::to_string(E);
  r.ours_gflops = 2.0 * B * H * E / ours / 1e9;
  r.ours_gbytes =
      4.0 * (static_cast<double>(B) * H + H * E + static_cast<double>(B) * E) / ours / 1e9;
  r.peak_gflops = 2.0 * 8192.0 * 8192.0 * 8192.0 / peak / 1e9;
  return r;
}

Result<std::unique_ptr<GatingEngine>> MakeCudaEngine() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorInsufficientDriver)
    return Status::FailedPrecondition("no NVIDIA driver new enough for this CUDA build");
  if (e == cudaErrorNoDevice) return Status::FailedPrecondition("no GPU present");
  if (e != cudaSuccess)
    return Status::FailedPrecondition(std::string("no usable GPU: ") + cudaGetErrorString(e));
  if (n == 0) return Status::FailedPrecondition("no GPU present");
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess)
    return Status::FailedPrecondition("cannot query GPU 0");
  auto engine = std::make_unique<CudaEngine>(0, std::string("cuda:0 (") + prop.name + ")");
  CORTEX_RETURN_IF_ERROR(engine->Init());
  return std::unique_ptr<GatingEngine>(std::move(engine));
}

}  // namespace cortex
