// CPU engine: sparse gathers and scatters in plain loops, the dense layers through BLAS.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <shared_mutex>
#include <thread>

#include "gating_plan.h"

namespace cortex {
namespace internal {

StepPlan MakeStepPlan(const GatingModel& m, const TrainSet& data, const std::vector<int>& order,
                      size_t begin, size_t end, const std::vector<uint64_t>& expert_keys) {
  StepPlan p;
  const uint32_t mask = static_cast<uint32_t>(m.rows() - 1);
  struct Ref {
    uint32_t key;
    int pos;
    float val;
  };
  std::vector<Ref> emb, wide;
  p.x_off.push_back(0);
  for (size_t k = begin; k < end; ++k) {
    const TrainRow& r = data.rows[order[k]];
    const int pos = static_cast<int>(k - begin);
    p.rows.push_back(order[k]);
    p.col.push_back(r.expert);
    for (int j = data.x.offsets[r.x]; j < data.x.offsets[r.x + 1]; ++j) {
      const uint32_t i = data.x.idx[j] & mask;
      const uint32_t w = static_cast<uint32_t>(m.WideIndex(i, expert_keys[r.expert]));
      emb.push_back({i, pos, data.x.val[j]});
      wide.push_back({w, pos, data.x.val[j]});
      p.x_emb.push_back(i);
      p.x_wide.push_back(w);
      p.x_val.push_back(data.x.val[j]);
    }
    p.x_off.push_back(static_cast<int>(p.x_val.size()));
  }
  auto group = [](std::vector<Ref>& refs, std::vector<uint32_t>* keys, std::vector<int>* off,
                  std::vector<int>* pos, std::vector<float>* val) {
    std::stable_sort(refs.begin(), refs.end(),
                     [](const Ref& a, const Ref& b) { return a.key < b.key; });
    for (size_t k = 0; k < refs.size(); ++k) {
      if (k == 0 || refs[k].key != refs[k - 1].key) {
        keys->push_back(refs[k].key);
        off->push_back(static_cast<int>(k));
      }
      pos->push_back(refs[k].pos);
      val->push_back(refs[k].val);
    }
    off->push_back(static_cast<int>(refs.size()));
  };
  group(emb, &p.emb_rows, &p.emb_off, &p.emb_pos, &p.emb_val);
  group(wide, &p.wide_idx, &p.wide_off, &p.wide_pos, &p.wide_val);
  return p;
}

HeadMatrix Heads(const GatingModel& m, const std::vector<std::string>& experts) {
  const size_t E = experts.size(), H = static_cast<size_t>(m.hidden());
  HeadMatrix hm{std::vector<float>(E * H, 0.0f), std::vector<float>(E, 0.0f),
                std::vector<uint64_t>(E)};
  for (size_t e = 0; e < E; ++e) {
    hm.keys[e] = GatingModel::ExpertKey(experts[e]);
    if (const ExpertHead* h = m.Head(experts[e])) {
      std::copy(h->w.begin(), h->w.end(), hm.U.begin() + e * H);
      hm.bias[e] = h->bias;
    }
  }
  return hm;
}

}  // namespace internal

namespace {

using internal::Sigmoid;

}  // namespace
}  // namespace cortex

// OpenBLAS's pthread build spins its pool on every call; our products are small, so one
// thread is faster. Weak: other BLAS builds do not have it.
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

namespace cortex {
namespace {

inline void Adagrad(float* theta, float* acc, float g, float lr) {
  *acc += g * g;
  *theta -= lr * g / std::sqrt(*acc);
}

// Splits [0, n) over up to two threads when the batch is large enough to pay for it.
template <typename Fn>
void ParallelRows(int n, Fn fn) {
  const int threads =
      n >= 256 ? std::min(2u, std::max(1u, std::thread::hardware_concurrency())) : 1;
  if (threads == 1) return fn(0, n);
  std::thread t([&] { fn(n / 2, n); });
  fn(0, n / 2);
  t.join();
}

class CpuEngine : public GatingEngine {
 public:
  CpuEngine() {
    if (openblas_set_num_threads) openblas_set_num_threads(1);
  }
  std::string backend() const override { return "cpu"; }

  Status Score(const GatingModel& m, const SparseBatch& x, const std::vector<std::string>& experts,
               const std::vector<float>& prior, std::vector<float>* out) override {
    const int B = x.rows(), E = static_cast<int>(experts.size()), H = m.hidden();
    const uint32_t mask = static_cast<uint32_t>(m.rows() - 1);
    out->assign(static_cast<size_t>(B) * E, 0.0f);
    if (B == 0 || E == 0) return Status::OK();
    const internal::HeadMatrix hm = internal::Heads(m, experts);
    const std::vector<float>&U = hm.U, &bias = hm.bias;
    const std::vector<uint64_t>& keys = hm.keys;
    hid_.resize(static_cast<size_t>(B) * H);
    ParallelRows(B, [&](int lo, int hi) {
      for (int b = lo; b < hi; ++b) {
        float* h = &hid_[static_cast<size_t>(b) * H];
        std::copy(m.b1.begin(), m.b1.end(), h);
        for (int j = x.offsets[b]; j < x.offsets[b + 1]; ++j) {
          const float* row = &m.emb[static_cast<size_t>(x.idx[j] & mask) * H];
          const float v = x.val[j];
          for (int c = 0; c < H; ++c) h[c] += v * row[c];
        }
        for (int c = 0; c < H; ++c) h[c] = std::tanh(h[c]);
      }
    });
    float* Z = out->data();
    const int wbits = m.shape().wide_bits;
    ParallelRows(B, [&](int lo, int hi) {
      std::vector<uint64_t> mix;
      for (int b = lo; b < hi; ++b) {
        // Each row's head products on its own (not one GEMM over the batch, whose kernels
        // may sum a row differently by batch size): a task scores the same bits alone or
        // in any batch, which `explain` relies on.
        const float* h = &hid_[static_cast<size_t>(b) * H];
        for (int e = 0; e < E; ++e) {
          const float* u = &U[static_cast<size_t>(e) * H];
          float z = 0;
          for (int c = 0; c < H; ++c) z += h[c] * u[c];
          Z[b * E + e] = z;
        }
        mix.clear();
        for (int j = x.offsets[b]; j < x.offsets[b + 1]; ++j)
          mix.push_back(GatingModel::FeatureMix(x.idx[j] & mask));
        for (int e = 0; e < E; ++e) {
          float z = Z[b * E + e] + bias[e] + m.prior_b + m.prior_w * prior[b * E + e];
          for (int j = x.offsets[b], k = 0; j < x.offsets[b + 1]; ++j, ++k)
            z += x.val[j] * m.wide[GatingModel::WideSlot(mix[k], keys[e], wbits)];
          Z[b * E + e] = Sigmoid(z);
        }
      }
    });
    return Status::OK();
  }

  Status Train(GatingModel* m, const TrainSet& data, const TrainOptions& opt) override {
    const int E = static_cast<int>(data.experts.size()), H = m->hidden();
    if (data.rows.empty() || E == 0) return Status::OK();
    using Lock = std::shared_mutex;
    auto reading = [&] {
      return opt.lock ? std::shared_lock<Lock>(*opt.lock) : std::shared_lock<Lock>();
    };
    auto writing = [&] {
      return opt.lock ? std::unique_lock<Lock>(*opt.lock) : std::unique_lock<Lock>();
    };
    std::vector<uint64_t> keys(E);
    std::vector<ExpertHead*> heads(E);
    std::vector<std::vector<float>*> gheads(E);
    {
      auto w = writing();  // (a new expert's head is added)
      for (int e = 0; e < E; ++e) {
        keys[e] = GatingModel::ExpertKey(data.experts[e]);
        heads[e] = m->MutableHead(data.experts[e]);
        gheads[e] = &m->g_heads[data.experts[e]];
      }
    }
    std::vector<float> U(static_cast<size_t>(E) * H), Hm, Z, dZ, dU(static_cast<size_t>(E) * H), dH;
    CORTEX_RETURN_IF_ERROR(internal::ForEachMinibatch(
        *m, data, opt, keys, [&](const internal::StepPlan& p, int n) -> Status {
          auto r = reading();
          // Every row this minibatch reads and updates, asked for at once: the tables are
          // far larger than the caches, and one miss after another was most of a small
          // step's time (results are unchanged: prefetching moves no value).
          for (uint32_t row : p.emb_rows)
            for (int c = 0; c < H; c += 16) {
              __builtin_prefetch(&m->emb[static_cast<size_t>(row) * H + c]);
              __builtin_prefetch(&m->g_emb[static_cast<size_t>(row) * H + c], 1);
            }
          for (uint32_t w : p.wide_idx) {
            __builtin_prefetch(&m->wide[w], 1);
            __builtin_prefetch(&m->g_wide[w], 1);
          }
          for (int e = 0; e < E; ++e)
            std::copy(heads[e]->w.begin(), heads[e]->w.end(),
                      U.begin() + static_cast<size_t>(e) * H);
          // Forward.
          Hm.assign(static_cast<size_t>(n) * H, 0.0f);
          for (int k = 0; k < n; ++k) {
            float* h = &Hm[static_cast<size_t>(k) * H];
            std::copy(m->b1.begin(), m->b1.end(), h);
            for (int j = p.x_off[k]; j < p.x_off[k + 1]; ++j) {
              const float* row = &m->emb[static_cast<size_t>(p.x_emb[j]) * H];
              for (int c = 0; c < H; ++c) h[c] += p.x_val[j] * row[c];
            }
            for (int c = 0; c < H; ++c) h[c] = std::tanh(h[c]);
          }
          Z.assign(static_cast<size_t>(n) * E, 0.0f);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, E, H, 1.0f, Hm.data(), H,
                      U.data(), H, 0.0f, Z.data(), E);
          dZ.assign(static_cast<size_t>(n) * E, 0.0f);
          float g_pw = 0, g_pb = 0;
          std::vector<float> g_bias(E, 0.0f);
          for (int k = 0; k < n; ++k) {
            const TrainRow& r = data.rows[p.rows[k]];
            const int e = p.col[k];
            float z = Z[k * E + e] + heads[e]->bias + m->prior_b + m->prior_w * r.prior;
            for (int j = p.x_off[k]; j < p.x_off[k + 1]; ++j)
              z += p.x_val[j] * m->wide[p.x_wide[j]];
            const float dz = r.weight * (Sigmoid(z) - r.reward) / static_cast<float>(n);
            dZ[k * E + e] = dz;
            g_bias[e] += dz;
            g_pw += dz * r.prior;
            g_pb += dz;
          }
          // Backward through the dense layers.
          cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, H, n, 1.0f, dZ.data(), E,
                      Hm.data(), H, 0.0f, dU.data(), H);
          dH.assign(static_cast<size_t>(n) * H, 0.0f);
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, E, 1.0f, dZ.data(), E,
                      U.data(), H, 0.0f, dH.data(), H);
          for (size_t i = 0; i < dH.size(); ++i) dH[i] *= 1.0f - Hm[i] * Hm[i];
          r = {};
          auto w = writing();
          // Updates.
          for (int e = 0; e < E; ++e) {
            if (g_bias[e] == 0.0f) continue;  // expert not in this minibatch
            std::vector<float>& acc = *gheads[e];
            for (int c = 0; c < H; ++c)
              Adagrad(&heads[e]->w[c], &acc[c], dU[static_cast<size_t>(e) * H + c], opt.lr);
            Adagrad(&heads[e]->bias, &acc[H], g_bias[e], opt.lr);
          }
          Adagrad(&m->prior_w, &m->g_prior_w, g_pw, opt.lr);
          Adagrad(&m->prior_b, &m->g_prior_b, g_pb, opt.lr);
          for (int c = 0; c < H; ++c) {
            float g = 0;
            for (int k = 0; k < n; ++k) g += dH[static_cast<size_t>(k) * H + c];
            Adagrad(&m->b1[c], &m->g_b1[c], g, opt.lr);
          }
          std::vector<float> g(H);
          for (size_t u = 0; u < p.emb_rows.size(); ++u) {
            std::fill(g.begin(), g.end(), 0.0f);
            for (int s = p.emb_off[u]; s < p.emb_off[u + 1]; ++s) {
              const float* d = &dH[static_cast<size_t>(p.emb_pos[s]) * H];
              for (int c = 0; c < H; ++c) g[c] += p.emb_val[s] * d[c];
            }
            const size_t base = static_cast<size_t>(p.emb_rows[u]) * H;
            for (int c = 0; c < H; ++c)
              Adagrad(&m->emb[base + c], &m->g_emb[base + c], g[c], opt.lr);
          }
          for (size_t u = 0; u < p.wide_idx.size(); ++u) {
            float gw = 0;
            for (int s = p.wide_off[u]; s < p.wide_off[u + 1]; ++s) {
              const int k = p.wide_pos[s];
              gw += p.wide_val[s] * dZ[k * E + p.col[k]];
            }
            Adagrad(&m->wide[p.wide_idx[u]], &m->g_wide[p.wide_idx[u]], gw, opt.lr_wide);
          }
          return Status::OK();
        }));
    auto w = writing();
    m->stamp = GatingModel::NextStamp();
    return Status::OK();
  }

 private:
  std::vector<float> hid_;
};

}  // namespace

std::unique_ptr<GatingEngine> MakeCpuEngine() { return std::make_unique<CpuEngine>(); }

}  // namespace cortex
