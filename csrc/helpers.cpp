// megaflow.data._helpers: the dataset-index loops that are too slow in Python.
//
// Same results as the numpy fallback in megaflow/data/helpers.py (and as Megatron-Core's
// helpers.cpp, whose semantics both follow); tests/unit/test_data_helpers.py checks all three agree.
//   build_sample_idx_int32 / _int64     [num_samples + 1, 2] (document-index position, token offset)
//   build_blending_indices              greedy weighted interleaving of datasets
//   build_exhaustive_blending_indices   the same, drawing exactly sizes[i] samples from dataset i
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

// Walk the token stream of document_idx in steps of seq_length. Sample k ends where the stream
// position (k + 1) * seq_length falls; the row records the document position that holds the
// sample's last needed token (position + extra - 1) and the offset of the boundary inside it.
template <typename T>
py::array_t<T> build_sample_idx(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes_,
                                const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& doc_idx_,
                                int32_t seq_length, int32_t num_epochs, int64_t tokens_per_epoch,
                                bool drop_last_partial_sequence, int32_t extra) {
  if (seq_length <= 1 || num_epochs <= 0 || tokens_per_epoch <= 1)
    throw std::invalid_argument("build_sample_idx: need seq_length > 1, num_epochs > 0, tokens_per_epoch > 1");
  auto sizes = sizes_.unchecked<1>();
  auto doc_idx = doc_idx_.unchecked<1>();
  const int64_t n_docs = doc_idx_.shape(0);
  const int64_t total = static_cast<int64_t>(num_epochs) * tokens_per_epoch - extra;
  // The keep-partial count divides in single precision, as the reference does.
  const int64_t num_samples = drop_last_partial_sequence
                                  ? total / seq_length
                                  : static_cast<int64_t>(std::ceil(static_cast<float>(total) / static_cast<float>(seq_length)));

  py::array_t<T> out({num_samples + 1, static_cast<int64_t>(2)});
  auto o = out.template mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t d = 0;       // position in doc_idx
    int64_t offset = 0;  // token offset inside document doc_idx[d]
    o(0, 0) = 0;
    o(0, 1) = 0;
    for (int64_t k = 1; k <= num_samples; ++k) {
      int64_t remaining = static_cast<int64_t>(seq_length) + extra;
      while (remaining != 0) {
        const int64_t doc_len = static_cast<int64_t>(sizes[doc_idx[d]]) - offset;
        if (remaining <= doc_len) {  // the sample ends inside this document
          offset += remaining - extra;
          remaining = 0;
        } else if (d == n_docs - 1) {  // stream exhausted: only the kept partial last sample
          offset = static_cast<int64_t>(sizes[doc_idx[d]]) - extra;
          remaining = 0;
        } else {
          remaining -= doc_len;
          ++d;
          offset = 0;
        }
      }
      o(k, 0) = static_cast<T>(d);
      o(k, 1) = static_cast<T>(offset);
    }
  }
  return out;
}

void build_blending_indices(py::array_t<int16_t, py::array::c_style>& dataset_index,
                            py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                            const py::array_t<double, py::array::c_style | py::array::forcecast>& weights_,
                            int32_t num_datasets, int64_t size) {
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  auto w = weights_.unchecked<1>();
  if (dataset_index.shape(0) < size || dataset_sample_index.shape(0) < size || weights_.shape(0) < num_datasets)
    throw std::invalid_argument("build_blending_indices: arrays shorter than size / num_datasets");
  std::vector<int64_t> counts(num_datasets, 0);
  py::gil_scoped_release release;
  for (int64_t k = 0; k < size; ++k) {
    const double kd = std::max(static_cast<double>(k), 1.0);
    int32_t best = 0;
    double best_err = w[0] * kd - static_cast<double>(counts[0]);
    for (int32_t i = 1; i < num_datasets; ++i) {
      const double err = w[i] * kd - static_cast<double>(counts[i]);
      if (err > best_err) {  // strict: the first dataset wins ties
        best_err = err;
        best = i;
      }
    }
    di[k] = static_cast<int16_t>(best);
    dsi[k] = counts[best]++;
  }
}

void build_exhaustive_blending_indices(py::array_t<int16_t, py::array::c_style>& dataset_index,
                                       py::array_t<int64_t, py::array::c_style>& dataset_sample_index,
                                       const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& sizes_,
                                       int32_t num_datasets) {
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  auto sizes = sizes_.unchecked<1>();
  int64_t total = 0;
  for (int32_t i = 0; i < num_datasets; ++i) total += sizes[i];
  if (dataset_index.shape(0) < total || dataset_sample_index.shape(0) < total)
    throw std::invalid_argument("build_exhaustive_blending_indices: arrays shorter than sum(sizes)");
  std::vector<double> w(num_datasets);
  std::vector<int64_t> counts(num_datasets, 0);
  std::vector<int32_t> unspent;  // ascending, so ties go to the lowest dataset id
  for (int32_t i = 0; i < num_datasets; ++i) {
    w[i] = static_cast<double>(sizes[i]) / static_cast<double>(total);
    if (sizes[i] > 0) unspent.push_back(i);
  }
  py::gil_scoped_release release;
  for (int64_t k = 0; !unspent.empty(); ++k) {
    const double kd = std::max(static_cast<double>(k), 1.0);
    size_t best_pos = 0;
    double best_err = -std::numeric_limits<double>::infinity();
    for (size_t p = 0; p < unspent.size(); ++p) {
      const int32_t i = unspent[p];
      const double err = w[i] * kd - static_cast<double>(counts[i]);
      if (err > best_err) {
        best_err = err;
        best_pos = p;
      }
    }
    const int32_t best = unspent[best_pos];
    di[k] = static_cast<int16_t>(best);
    dsi[k] = counts[best]++;
    if (counts[best] == sizes[best]) unspent.erase(unspent.begin() + static_cast<std::ptrdiff_t>(best_pos));
  }
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "megaflow dataset-index helpers (C++); numpy twins live in megaflow/data/helpers.py";
  m.def("build_sample_idx_int32", &build_sample_idx<int32_t>);
  m.def("build_sample_idx_int64", &build_sample_idx<int64_t>);
  m.def("build_blending_indices", &build_blending_indices);
  m.def("build_exhaustive_blending_indices", &build_exhaustive_blending_indices);
}
