// The experts of a MoE layer held by the quantised kernels' library for quant_moe.cpp's op: the object Python makes
// once per layer (torch.classes.dsvl2_quant.Experts, model/quant_kernels.py's hold_experts), its registry of handles
// and the table of weights the op reads.

#pragma once

#include <torch/custom_class.h>

#include <array>
#include <mutex>
#include <unordered_map>

namespace dsvl2_quant_detail {

// An expert's weight e of N rows and K inputs (what: gate / up / down) in its kernel layout, and its scales.
inline void check_weights(const char* what, at::TensorList q, at::TensorList s, int bits, int64_t N, int64_t K,
                   int64_t group, int64_t e, at::ScalarType scale_type) {
  const int64_t steps = (K + 15) / 16, bytes = bits == 8 ? steps * 64 : steps * 32;
  TORCH_CHECK(q[e].scalar_type() == (bits == 8 ? at::kChar : at::kByte) && q[e].is_contiguous() && q[e].dim() == 2 &&
                  q[e].size(0) == (N + 3) / 4 && q[e].size(1) == bytes && q[e].device().is_cpu(),
              "quant moe: expert ", e, "'s ", what, " weight is ", q[e].sizes(), " (needs a contiguous (",
              (N + 3) / 4, ", ", bytes, ") kernel layout)");
  const bool shape = bits == 8 ? s[e].dim() == 1 && s[e].size(0) == N
                               : s[e].dim() == 2 && s[e].size(0) == N && s[e].size(1) * group == K;
  TORCH_CHECK(shape && s[e].scalar_type() == scale_type && s[e].device().is_cpu(), "quant moe: expert ", e, "'s ",
              what, " scales are ", s[e].sizes(), " ", s[e].scalar_type());
}

// One expert's three matrices (gate, up, down) as the products read them: the weights' data, their blocks of 4
// rows apart, their scales; and the expert's width I.
struct ExpertRows {
  const void* q[3];
  int64_t block_bytes[3];
  const void* s[3];
  int64_t width;
};

struct Experts;

struct Registry {
  std::mutex lock;
  int64_t next = 1;
  std::unordered_map<int64_t, c10::weak_intrusive_ptr<Experts>> held;
};

inline Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: objects may outlive static destruction's order
  return *r;
}

// A MoE layer's expert weights held by the library (torch.classes.dsvl2_quant.Experts, made once per layer by
// model/quant_experts.py's QuantExperts), so that a decode step's call hands over one object, not six lists of every
// expert's tensors: converting those lists (6 x 64 tensors for Tiny, each a cold object in the caches after a step
// of streaming weights) took ~140 us a call in the model, a tenth of an int4 decode step at batch 1. For the same
// reason the tensors are checked once per (bits, groups, width E) a call asks for, not per call, and the calls read
// their data through `rows`, one small table, instead of each active expert's six tensor objects.
//
// The op takes the object's handle (an int: `handle()` registers it), not the object: handing a script object to an
// op made torch's argument parser look for `__torch_function__` on it, an attribute lookup that throws and catches a
// C++ exception twice a call, ~8 us of a 16.7 us call (Zen 5). The registry holds weak references: an object dropped
// by Python is gone (its tensors freed, its entry erased), and its handle then fails with an error.
struct Experts : torch::CustomClassHolder {
  std::vector<at::Tensor> gate_q, gate_s, up_q, up_s, down_q, down_s;
  int64_t shared = 0;  // the last `shared` experts are the layer's shared ones: every token runs them, weight 1
  int64_t id = 0;
  std::vector<ExpertRows> rows;
  at::ScalarType scale_type = at::kFloat;
  std::mutex checking;
  std::array<int64_t, 4> checked{};  // the (bits, group_in, group_mid, E) the weights were checked for, else zeros

  Experts(std::vector<at::Tensor> gq, std::vector<at::Tensor> gs, std::vector<at::Tensor> uq,
          std::vector<at::Tensor> us, std::vector<at::Tensor> dq, std::vector<at::Tensor> ds, int64_t shared_experts)
      : gate_q(std::move(gq)), gate_s(std::move(gs)), up_q(std::move(uq)), up_s(std::move(us)),
        down_q(std::move(dq)), down_s(std::move(ds)), shared(shared_experts) {
    const size_t X = gate_q.size();
    for (const std::vector<at::Tensor>* l : {&gate_s, &up_q, &up_s, &down_q, &down_s})
      TORCH_CHECK(l->size() == X && X > 0, "quant moe: every list must name the same experts");
    TORCH_CHECK(shared >= 0 && shared < static_cast<int64_t>(X), "quant moe: ", shared, " shared experts of ", X);
    scale_type = gate_s[0].scalar_type();
    TORCH_CHECK(scale_type == at::kFloat || scale_type == at::kBFloat16, "quant moe: scales must be float32 or bf16");
    for (size_t e = 0; e < X; ++e) {
      TORCH_CHECK(gate_q[e].dim() == 2 && up_q[e].dim() == 2 && down_q[e].dim() == 2 && gate_s[e].dim() >= 1,
                  "quant moe: expert ", e, "'s weights must be 2-D kernel layouts");
      ExpertRows r{{gate_q[e].const_data_ptr(), up_q[e].const_data_ptr(), down_q[e].const_data_ptr()},
                   {gate_q[e].size(1), up_q[e].size(1), down_q[e].size(1)},
                   {gate_s[e].const_data_ptr(), up_s[e].const_data_ptr(), down_s[e].const_data_ptr()},
                   gate_s[e].size(0)};
      rows.push_back(r);
    }
  }

  // The table of every expert's weights, checked (once) to be what a call with these bits, groups and width E reads.
  const std::vector<ExpertRows>& rows_for(int bits, int64_t group_in, int64_t group_mid, int64_t E) {
    const std::array<int64_t, 4> key{bits, group_in, group_mid, E};
    const std::lock_guard<std::mutex> guard(checking);
    if (checked != key) {
      for (int64_t e = 0; e < static_cast<int64_t>(rows.size()); ++e) {
        const int64_t I = rows[e].width;
        TORCH_CHECK(bits == 8 || (group_in > 0 && E % group_in == 0 && group_mid > 0 && I % group_mid == 0),
                    "quant moe: groups of ", group_in, " and ", group_mid, " do not divide E=", E, " and I=", I);
        check_weights("gate", gate_q, gate_s, bits, I, E, group_in, e, scale_type);
        check_weights("up", up_q, up_s, bits, I, E, group_in, e, scale_type);
        check_weights("down", down_q, down_s, bits, E, I, group_mid, e, scale_type);
      }
      checked = key;
    }
    return rows;
  }

  // When Python drops the last reference (the registry's weak one keeps the object's memory, not its tensors).
  void release_resources() override {
    if (id != 0) {
      Registry& r = registry();
      const std::lock_guard<std::mutex> guard(r.lock);
      r.held.erase(id);
    }
    for (std::vector<at::Tensor>* l : {&gate_q, &gate_s, &up_q, &up_s, &down_q, &down_s}) l->clear();
    rows.clear();
  }
};

inline int64_t handle_of(const c10::intrusive_ptr<Experts>& e) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> guard(r.lock);
  if (e->id == 0) {
    e->id = r.next++;
    r.held.emplace(e->id, c10::weak_intrusive_ptr<Experts>(e));
  }
  return e->id;
}

inline c10::intrusive_ptr<Experts> held_experts(int64_t handle) {
  Registry& r = registry();
  const std::lock_guard<std::mutex> guard(r.lock);
  const auto found = r.held.find(handle);
  c10::intrusive_ptr<Experts> e = found == r.held.end() ? c10::intrusive_ptr<Experts>() : found->second.lock();
  TORCH_CHECK(e, "quant moe: no experts held under handle ", handle, " (the object was dropped)");
  return e;
}

}  // namespace dsvl2_quant_detail
