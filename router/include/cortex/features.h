// Hashed sparse text features shared by tasks and expert manifests, so that a task can be
// compared with an expert the router has never seen an outcome for.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "cortex/types.h"

namespace cortex {

// Sorted by index, unique indices, L2-normalised (or empty).
struct SparseVector {
  std::vector<uint32_t> idx;
  std::vector<float> val;
  size_t size() const { return idx.size(); }
};

float Dot(const SparseVector& a, const SparseVector& b);

struct ManifestText {
  std::string name;
  std::string description;
  std::vector<std::string> keywords;
  std::vector<std::string> examples;
};

class FeatureHasher {
 public:
  explicit FeatureHasher(int bits = 20) : bits_(bits) {}
  int bits() const { return bits_; }
  // Words, word pairs, character 4-grams inside words (so "vulnerab" meets
  // "vulnerability"), and tags as key=value tokens.
  SparseVector Task(const std::string& text, const Tags& tags) const;
  // The same features over the manifest; names and keywords weigh double.
  SparseVector Manifest(const ManifestText& m) const;

  // What each feature index of Task(text, tags) stands for, as "word:x", "pair:x y",
  // "first:x", "4gram:xxxx", "tag:k=v" (several joined by " | " when they share a bucket).
  std::unordered_map<uint32_t, std::string> Labels(const std::string& text, const Tags& tags) const;

  // Lower-cased alphanumeric words of `text`, stop words removed.
  static std::vector<std::string> Words(const std::string& text);

 private:
  // With `labels`, each feature's name is added beside it (for Labels).
  void AddText(const std::string& text, float weight, bool pairs,
               std::vector<std::pair<uint32_t, float>>* acc,
               std::vector<std::string>* labels = nullptr) const;
  uint32_t Hash(const std::string& ns, const std::string& s) const;
  static SparseVector Finish(std::vector<std::pair<uint32_t, float>>* acc);
  int bits_;
};

}  // namespace cortex
