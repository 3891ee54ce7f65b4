#include "cortex/features.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

namespace cortex {
namespace {

const std::unordered_set<std::string>& StopWords() {
  static const std::unordered_set<std::string> k = {
      "a",  "an", "the", "to", "of", "and", "or",   "in",   "on",   "for",  "with", "is",
      "be", "as", "at",  "by", "it", "its", "this", "that", "from", "into", "when", "if"};
  return k;
}

uint64_t Fnv1a(const std::string& ns, const std::string& s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : ns) h = (h ^ c) * 1099511628211ULL;
  h = (h ^ 0x1f) * 1099511628211ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

}  // namespace

float Dot(const SparseVector& a, const SparseVector& b) {
  float s = 0;
  size_t i = 0, j = 0;
  while (i < a.idx.size() && j < b.idx.size()) {
    if (a.idx[i] < b.idx[j])
      ++i;
    else if (a.idx[i] > b.idx[j])
      ++j;
    else
      s += a.val[i++] * b.val[j++];
  }
  return s;
}

std::vector<std::string> FeatureHasher::Words(const std::string& text) {
  std::vector<std::string> words;
  std::string cur;
  auto flush = [&] {
    if (!cur.empty() && !StopWords().count(cur)) words.push_back(cur);
    cur.clear();
  };
  for (unsigned char c : text) {
    if (std::isalnum(c))
      cur.push_back(static_cast<char>(std::tolower(c)));
    else if (c >= 0x80)
      cur.push_back(static_cast<char>(c));  // keep UTF-8 letters whole
    else
      flush();
  }
  flush();
  return words;
}

uint32_t FeatureHasher::Hash(const std::string& ns, const std::string& s) const {
  return static_cast<uint32_t>(Fnv1a(ns, s) & ((1ULL << bits_) - 1));
}

void FeatureHasher::AddText(const std::string& text, float weight, bool pairs,
                            std::vector<std::pair<uint32_t, float>>* acc,
                            std::vector<std::string>* labels) const {
  auto add = [&](const char* ns, const char* kind, const std::string& s, float w) {
    acc->emplace_back(Hash(ns, s), w);
    if (labels) labels->push_back(std::string(kind) + ":" + s);
  };
  std::vector<std::string> words = Words(text);
  // The leading word of a task is usually its verb ("fix", "add", "bump"): worth its own
  // feature besides the plain word.
  if (!words.empty()) add("f", "first", words[0], weight);
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    add("w", "word", w, weight);
    if (pairs && i + 1 < words.size()) add("b", "pair", w + " " + words[i + 1], weight);
    std::string padded = "^" + w + "$";
    if (padded.size() >= 5)
      for (size_t k = 0; k + 4 <= padded.size(); ++k)
        add("c", "4gram", padded.substr(k, 4), 0.3f * weight);
  }
}

std::unordered_map<uint32_t, std::string> FeatureHasher::Labels(const std::string& text,
                                                                const Tags& tags) const {
  std::vector<std::pair<uint32_t, float>> acc;
  std::vector<std::string> names;
  AddText(text, 1.0f, true, &acc, &names);
  for (const auto& [k, v] : tags) {
    acc.emplace_back(Hash("t", k + "=" + v), 1.0f);
    names.push_back("tag:" + k + "=" + v);
  }
  std::unordered_map<uint32_t, std::string> out;
  for (size_t i = 0; i < acc.size(); ++i) {
    std::string& l = out[acc[i].first];
    if (l.empty())
      l = names[i];
    else if (l != names[i] && l.find(names[i]) == std::string::npos)
      l += " | " + names[i];
  }
  return out;
}

SparseVector FeatureHasher::Finish(std::vector<std::pair<uint32_t, float>>* acc) {
  std::sort(acc->begin(), acc->end());
  SparseVector v;
  for (const auto& [i, w] : *acc) {
    if (!v.idx.empty() && v.idx.back() == i)
      v.val.back() += w;
    else {
      v.idx.push_back(i);
      v.val.push_back(w);
    }
  }
  double norm = 0;
  for (float& x : v.val) {
    x = std::sqrt(x);  // sublinear: repeating a word helps less each time
    norm += static_cast<double>(x) * x;
  }
  if (norm > 0) {
    float inv = static_cast<float>(1.0 / std::sqrt(norm));
    for (float& x : v.val) x *= inv;
  }
  return v;
}

SparseVector FeatureHasher::Task(const std::string& text, const Tags& tags) const {
  std::vector<std::pair<uint32_t, float>> acc;
  AddText(text, 1.0f, true, &acc);
  for (const auto& [k, v] : tags) acc.emplace_back(Hash("t", k + "=" + v), 1.0f);
  return Finish(&acc);
}

SparseVector FeatureHasher::Manifest(const ManifestText& m) const {
  std::vector<std::pair<uint32_t, float>> acc;
  AddText(m.name, 2.0f, false, &acc);
  AddText(m.description, 1.0f, true, &acc);
  for (const auto& k : m.keywords) AddText(k, 2.0f, true, &acc);
  for (const auto& e : m.examples) AddText(e, 1.0f, true, &acc);
  return Finish(&acc);
}

}  // namespace cortex
