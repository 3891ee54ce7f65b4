#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <random>

#include "cortex/gating.h"

namespace cortex {
namespace {

constexpr char kMagic[4] = {'C', 'X', 'G', 'M'};
constexpr uint32_t kFormat = 2;  // 2: Adagrad state stored beside each parameter

uint64_t SplitMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Initial value of Emb[r][c]: a pure function of (seed, r, c), so untouched rows need not
// be stored. Uniform in [-0.5, 0.5).
float InitValue(uint64_t seed, size_t r, size_t c, int hidden) {
  uint64_t h = SplitMix(seed ^ SplitMix(r * static_cast<uint64_t>(hidden) + c));
  return static_cast<float>(h >> 40) / static_cast<float>(1ULL << 24) - 0.5f;
}

void InitRow(const GatingShape& s, size_t r, float* row) {
  for (int c = 0; c < s.hidden; ++c) row[c] = InitValue(s.seed, r, c, s.hidden);
}

class Writer {
 public:
  template <typename T>
  void Put(const T& v) {
    out.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void PutFloats(const float* p, size_t n) {
    out.append(reinterpret_cast<const char*>(p), n * sizeof(float));
  }
  void PutString(const std::string& s) {
    Put(static_cast<uint32_t>(s.size()));
    out += s;
  }
  std::string out;
};

class Reader {
 public:
  explicit Reader(const std::string& s) : s_(s) {}
  template <typename T>
  bool Get(T* v) {
    if (pos_ + sizeof(T) > s_.size()) return false;
    std::memcpy(v, s_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool GetFloats(float* p, size_t n) {
    if (pos_ + n * sizeof(float) > s_.size()) return false;
    std::memcpy(p, s_.data() + pos_, n * sizeof(float));
    pos_ += n * sizeof(float);
    return true;
  }
  bool GetString(std::string* v) {
    uint32_t n;
    if (!Get(&n) || pos_ + n > s_.size()) return false;
    v->assign(s_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  bool done() const { return pos_ == s_.size(); }

 private:
  const std::string& s_;
  size_t pos_ = 0;
};

}  // namespace

uint64_t GatingModel::NextStamp() {
  static std::atomic<uint64_t> counter{0};
  return ++counter;
}

// Room for `n` floats in `v`, backed by huge pages where the kernel gives them on request
// (transparent huge pages in "madvise" mode): a step's reads and updates land on random
// rows of tables of many megabytes, and with 4 KiB pages most of them also missed the TLB.
// Asked before the first touch, so the pages are huge from their first fault.
static void Reserve(std::vector<float>* v, size_t n) {
  v->reserve(n);
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(v->data()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(v->data() + n)) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

GatingModel::GatingModel(const GatingShape& shape) : shape_(shape) {
  Reserve(&emb, rows() * shape_.hidden);
  Reserve(&g_emb, rows() * shape_.hidden);
  Reserve(&wide, wide_size());
  Reserve(&g_wide, wide_size());
  emb.resize(rows() * shape_.hidden);
  for (size_t r = 0; r < rows(); ++r) InitRow(shape_, r, &emb[r * shape_.hidden]);
  b1.assign(shape_.hidden, 0.0f);
  wide.assign(wide_size(), 0.0f);
  InitState();
}

void GatingModel::InitState() {
  // Adagrad accumulators start above zero so the first steps are bounded.
  g_emb.assign(emb.size(), 0.1f);
  g_b1.assign(b1.size(), 0.1f);
  g_wide.assign(wide.size(), 0.1f);
  g_heads.clear();
  g_prior_w = g_prior_b = 0.1f;
  stamp = NextStamp();
}

const ExpertHead* GatingModel::Head(const std::string& expert) const {
  auto it = heads.find(expert);
  return it == heads.end() ? nullptr : &it->second;
}

ExpertHead* GatingModel::MutableHead(const std::string& expert) {
  auto it = heads.find(expert);
  if (it == heads.end()) {
    it = heads.emplace(expert, ExpertHead{std::vector<float>(shape_.hidden, 0.0f), 0.0f}).first;
    g_heads[expert].assign(shape_.hidden + 1, 0.1f);
  }
  return &it->second;
}

uint64_t GatingModel::ExpertKey(const std::string& name) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ULL;
  return SplitMix(h);
}

uint64_t GatingModel::FeatureMix(uint32_t i) { return SplitMix(i); }

size_t GatingModel::WideIndex(uint32_t i, uint64_t ekey) const {
  return WideSlot(FeatureMix(i), ekey, shape_.wide_bits);
}

size_t GatingModel::TouchedRows() const {
  size_t n = 0;
  std::vector<float> init(shape_.hidden);
  for (size_t r = 0; r < rows(); ++r) {
    InitRow(shape_, r, init.data());
    if (std::memcmp(init.data(), &emb[r * shape_.hidden], shape_.hidden * sizeof(float))) ++n;
  }
  return n;
}

std::string GatingModel::Serialize() const {
  Writer w;
  w.out.append(kMagic, 4);
  w.Put(kFormat);
  w.Put(static_cast<int32_t>(shape_.bits));
  w.Put(static_cast<int32_t>(shape_.hidden));
  w.Put(static_cast<int32_t>(shape_.wide_bits));
  w.Put(shape_.seed);
  w.Put(prior_w);
  w.Put(prior_b);
  w.Put(g_prior_w);
  w.Put(g_prior_b);
  w.PutFloats(b1.data(), b1.size());
  w.PutFloats(g_b1.data(), g_b1.size());
  // Emb: changed rows only.
  std::vector<float> init(shape_.hidden);
  std::vector<uint32_t> touched;
  for (size_t r = 0; r < rows(); ++r) {
    InitRow(shape_, r, init.data());
    if (std::memcmp(init.data(), &emb[r * shape_.hidden], shape_.hidden * sizeof(float)))
      touched.push_back(static_cast<uint32_t>(r));
  }
  w.Put(static_cast<uint32_t>(touched.size()));
  for (uint32_t r : touched) {
    w.Put(r);
    w.PutFloats(&emb[size_t{r} * shape_.hidden], shape_.hidden);
    w.PutFloats(&g_emb[size_t{r} * shape_.hidden], shape_.hidden);
  }
  // Wide: non-zero entries only.
  uint32_t nz = 0;
  for (float v : wide) nz += v != 0.0f;
  w.Put(nz);
  for (size_t i = 0; i < wide.size(); ++i)
    if (wide[i] != 0.0f) {
      w.Put(static_cast<uint32_t>(i));
      w.Put(wide[i]);
      w.Put(g_wide[i]);
    }
  w.Put(static_cast<uint32_t>(heads.size()));
  for (const auto& [name, h] : heads) {
    w.PutString(name);
    w.Put(h.bias);
    w.PutFloats(h.w.data(), h.w.size());
    const auto g = g_heads.find(name);
    std::vector<float> acc =
        g != g_heads.end() ? g->second : std::vector<float>(h.w.size() + 1, 0.1f);
    w.PutFloats(acc.data(), acc.size());
  }
  return std::move(w.out);
}

Result<GatingModel> GatingModel::Deserialize(const std::string& blob) {
  auto bad = [](const std::string& why) {
    return Status::Corruption("model blob is not a Cortex gating model: " + why);
  };
  if (blob.size() < 4 || std::memcmp(blob.data(), kMagic, 4)) return bad("bad magic");
  Reader r(blob);
  char magic[4];
  r.Get(&magic);
  uint32_t format;
  int32_t bits, hidden, wide_bits;
  GatingShape s;
  if (!r.Get(&format) || format != kFormat) return bad("unknown format version");
  if (!r.Get(&bits) || !r.Get(&hidden) || !r.Get(&wide_bits) || !r.Get(&s.seed))
    return bad("truncated header");
  if (bits < 4 || bits > 24 || hidden < 1 || hidden > 1024 || wide_bits < 4 || wide_bits > 26)
    return bad("shape out of range");
  s.bits = bits;
  s.hidden = hidden;
  s.wide_bits = wide_bits;
  GatingModel m(s);
  if (!r.Get(&m.prior_w) || !r.Get(&m.prior_b) || !r.Get(&m.g_prior_w) || !r.Get(&m.g_prior_b) ||
      !r.GetFloats(m.b1.data(), m.b1.size()) || !r.GetFloats(m.g_b1.data(), m.g_b1.size()))
    return bad("truncated");
  uint32_t n;
  if (!r.Get(&n)) return bad("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    uint32_t row;
    if (!r.Get(&row) || row >= m.rows() || !r.GetFloats(&m.emb[size_t{row} * hidden], hidden) ||
        !r.GetFloats(&m.g_emb[size_t{row} * hidden], hidden))
      return bad("bad embedding row");
  }
  if (!r.Get(&n)) return bad("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    uint32_t i;
    float v;
    float g;
    if (!r.Get(&i) || i >= m.wide.size() || !r.Get(&v) || !r.Get(&g)) return bad("bad wide entry");
    m.wide[i] = v;
    m.g_wide[i] = g;
  }
  if (!r.Get(&n)) return bad("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    std::string name;
    ExpertHead h;
    h.w.resize(hidden);
    if (!r.GetString(&name) || !r.Get(&h.bias) || !r.GetFloats(h.w.data(), h.w.size()))
      return bad("bad expert head");
    m.heads[name] = std::move(h);
    std::vector<float>& acc = m.g_heads[name];
    acc.resize(hidden + 1);
    if (!r.GetFloats(acc.data(), acc.size())) return bad("bad expert head state");
  }
  if (!r.done()) return bad("trailing bytes");
  m.stamp = NextStamp();
  return m;
}

void SparseBatch::Add(const SparseVector& v, uint32_t mask) {
  for (size_t k = 0; k < v.size(); ++k) {
    idx.push_back(v.idx[k] & mask);
    val.push_back(v.val[k]);
  }
  offsets.push_back(static_cast<int>(idx.size()));
}

std::vector<int> EpochOrder(size_t n, uint64_t seed, int epoch, bool shuffle) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (shuffle) {
    std::mt19937_64 rng(SplitMix(seed * 1000003ULL + static_cast<uint64_t>(epoch)));
    for (size_t i = n; i > 1; --i) {
      size_t j = std::uniform_int_distribution<size_t>(0, i - 1)(rng);
      std::swap(order[i - 1], order[j]);
    }
  }
  return order;
}

}  // namespace cortex
