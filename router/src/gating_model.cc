#include <sys/mman.h>

#include <atomic>
#include <cstring>
#include <numeric>
#include <random>

#include "cortex/gating.h"

namespace cortex {
namespace {

constexpr char kMagic[4] = {'C', 'X', 'G', 'M'};
constexpr char kDeltaMagic[4] = {'C', 'X', 'G', 'D'};  // rows changed since a base checkpoint
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

}  // namespace

namespace blob {

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

}  // namespace blob

using blob::Reader;
using blob::Writer;

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

void GatingModel::WriteHeader(Writer* w, const char* magic) const {
  w->out.append(magic, 4);
  w->Put(kFormat);
  w->Put(static_cast<int32_t>(shape_.bits));
  w->Put(static_cast<int32_t>(shape_.hidden));
  w->Put(static_cast<int32_t>(shape_.wide_bits));
  w->Put(shape_.seed);
}

// The parameters: the small ones whole, the embedding rows and wide entries listed.
void GatingModel::WriteBody(Writer* wp, const std::vector<uint32_t>& rows_out,
                            const std::vector<uint32_t>& wide_out) const {
  Writer& w = *wp;
  w.Put(prior_w);
  w.Put(prior_b);
  w.Put(g_prior_w);
  w.Put(g_prior_b);
  w.PutFloats(b1.data(), b1.size());
  w.PutFloats(g_b1.data(), g_b1.size());
  w.Put(static_cast<uint32_t>(rows_out.size()));
  for (uint32_t r : rows_out) {
    w.Put(r);
    w.PutFloats(&emb[size_t{r} * shape_.hidden], shape_.hidden);
    w.PutFloats(&g_emb[size_t{r} * shape_.hidden], shape_.hidden);
  }
  w.Put(static_cast<uint32_t>(wide_out.size()));
  for (uint32_t i : wide_out) {
    w.Put(i);
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
}

std::string GatingModel::Serialize() const {
  Writer w;
  WriteHeader(&w, kMagic);
  // Emb: changed rows only; wide: non-zero entries only.
  std::vector<float> init(shape_.hidden);
  std::vector<uint32_t> touched, nz;
  for (size_t r = 0; r < rows(); ++r) {
    InitRow(shape_, r, init.data());
    if (std::memcmp(init.data(), &emb[r * shape_.hidden], shape_.hidden * sizeof(float)))
      touched.push_back(static_cast<uint32_t>(r));
  }
  for (size_t i = 0; i < wide.size(); ++i)
    if (wide[i] != 0.0f) nz.push_back(static_cast<uint32_t>(i));
  WriteBody(&w, touched, nz);
  return w.out;
}

std::string GatingModel::SerializeDelta(int64_t base_step, const std::vector<uint8_t>& emb_rows,
                                        const std::vector<uint8_t>& wide_entries) const {
  Writer w;
  WriteHeader(&w, kDeltaMagic);
  w.Put(base_step);
  std::vector<uint32_t> rows_out, wide_out;
  for (size_t r = 0; r < emb_rows.size(); ++r)
    if (emb_rows[r]) rows_out.push_back(static_cast<uint32_t>(r));
  for (size_t i = 0; i < wide_entries.size(); ++i)
    if (wide_entries[i]) wide_out.push_back(static_cast<uint32_t>(i));
  WriteBody(&w, rows_out, wide_out);
  return w.out;
}

bool GatingModel::DeltaBase(const std::string& blob, int64_t* base_step) {
  const size_t at = 4 + sizeof(uint32_t) + 3 * sizeof(int32_t) + sizeof(uint64_t);
  if (blob.size() < at + sizeof(int64_t) || std::memcmp(blob.data(), kDeltaMagic, 4)) return false;
  std::memcpy(base_step, blob.data() + at, sizeof(int64_t));
  return true;
}

namespace {
Status BadBlob(const std::string& why) {
  return Status::Corruption("model blob is not a Cortex gating model: " + why);
}

// The header's shape, after checking its magic and format.
Status ReadHeader(Reader* r, const char* magic, GatingShape* s) {
  char m[4];
  uint32_t format;
  int32_t bits, hidden, wide_bits;
  if (!r->Get(&m) || std::memcmp(m, magic, 4)) return BadBlob("bad magic");
  if (!r->Get(&format) || format != kFormat) return BadBlob("unknown format version");
  if (!r->Get(&bits) || !r->Get(&hidden) || !r->Get(&wide_bits) || !r->Get(&s->seed))
    return BadBlob("truncated header");
  if (bits < 4 || bits > 24 || hidden < 1 || hidden > 1024 || wide_bits < 4 || wide_bits > 26)
    return BadBlob("shape out of range");
  s->bits = bits;
  s->hidden = hidden;
  s->wide_bits = wide_bits;
  return Status::OK();
}
}  // namespace

// Reads WriteBody's parameters into the model: the small ones replaced, the listed rows and
// entries overwritten, the rest left as they are.
Status GatingModel::ReadBody(Reader* rp) {
  Reader& r = *rp;
  const int hidden = shape_.hidden;
  if (!r.Get(&prior_w) || !r.Get(&prior_b) || !r.Get(&g_prior_w) || !r.Get(&g_prior_b) ||
      !r.GetFloats(b1.data(), b1.size()) || !r.GetFloats(g_b1.data(), g_b1.size()))
    return BadBlob("truncated");
  uint32_t n;
  if (!r.Get(&n)) return BadBlob("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    uint32_t row;
    if (!r.Get(&row) || row >= rows() || !r.GetFloats(&emb[size_t{row} * hidden], hidden) ||
        !r.GetFloats(&g_emb[size_t{row} * hidden], hidden))
      return BadBlob("bad embedding row");
  }
  if (!r.Get(&n)) return BadBlob("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    uint32_t i;
    float v;
    float g;
    if (!r.Get(&i) || i >= wide.size() || !r.Get(&v) || !r.Get(&g))
      return BadBlob("bad wide entry");
    wide[i] = v;
    g_wide[i] = g;
  }
  if (!r.Get(&n)) return BadBlob("truncated");
  for (uint32_t k = 0; k < n; ++k) {
    std::string name;
    ExpertHead h;
    h.w.resize(hidden);
    if (!r.GetString(&name) || !r.Get(&h.bias) || !r.GetFloats(h.w.data(), h.w.size()))
      return BadBlob("bad expert head");
    heads[name] = std::move(h);
    std::vector<float>& acc = g_heads[name];
    acc.resize(hidden + 1);
    if (!r.GetFloats(acc.data(), acc.size())) return BadBlob("bad expert head state");
  }
  if (!r.done()) return BadBlob("trailing bytes");
  stamp = NextStamp();
  return Status::OK();
}

Result<GatingModel> GatingModel::Deserialize(const std::string& blob) {
  Reader r(blob);
  GatingShape s;
  CORTEX_RETURN_IF_ERROR(ReadHeader(&r, kMagic, &s));
  GatingModel m(s);
  CORTEX_RETURN_IF_ERROR(m.ReadBody(&r));
  return m;
}

Status GatingModel::ApplyDelta(const std::string& blob) {
  Reader r(blob);
  GatingShape s;
  CORTEX_RETURN_IF_ERROR(ReadHeader(&r, kDeltaMagic, &s));
  if (s.bits != shape_.bits || s.hidden != shape_.hidden || s.wide_bits != shape_.wide_bits ||
      s.seed != shape_.seed)
    return BadBlob("a delta of another shape");
  int64_t base;
  if (!r.Get(&base)) return BadBlob("truncated header");
  return ReadBody(&r);
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
