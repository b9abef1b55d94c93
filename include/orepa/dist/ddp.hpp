#pragma once
/// @file ddp.hpp
/// `DistributedDataParallel<Net>`: data-parallel training of any network with the layer
/// members of blocks/block.hpp (a block, a Sequential, a user model) on MPI, as PyTorch's
/// DistributedDataParallel + SyncBatchNorm:
///
///     MPI_Init(&argc, &argv);
///     Sequential<float> net = build();                 // the same on every rank
///     DistributedDataParallel ddp(net);                // checks, broadcasts from rank 0, SyncBN
///     SGD<float> opt(net.parameters(), SGDOptions(0.1));
///     for (...) {                                      // every rank on its own share of the batch
///       opt.zero_grad();
///       const auto& logits = ddp.forward_train(x);     // BN statistics over all ranks
///       ce.forward_train(logits, labels);
///       ddp.backward(ce.backward());                   // gradients averaged over all ranks
///       opt.step();                                    // identical on every rank
///     }
///
/// At construction every rank compares its options with rank 0's (sync BN, bucket size
/// and timeout decide which collectives run and how long they wait), then its parameter
/// and buffer names and shapes (one small all-gather); if either differs, every rank
/// throws dist_error naming the ranks and the first difference. Then
/// rank 0's parameters, buffers and BN counters are broadcast, and (with more than one
/// rank and sync_batch_norm) every BatchNorm2d gets a CrossReplicaSum over MPI: training
/// statistics span all ranks, so N ranks on batch B compute what one process computes on
/// batch N * B (same loss, gradients, running statistics). The reducers are removed again
/// when the wrapper is destroyed.
///
/// Gradients are averaged after backward in buckets: the parameters, last layer first,
/// are grouped into flat buffers of about bucket_bytes, allocated once; a bucket is packed,
/// summed in place with one MPI_Allreduce and unpacked scaled by 1 / size.
///
/// Faults never hang: forward_train and backward first all-gather the argument's shape
/// and throw on every rank when the shapes differ, so the network (identical on every
/// rank) then fails, if at all, identically everywhere. User code that may fail on one
/// rank between the wrapper's calls (labels, data loading) reports through agree(), or
/// runs inside dist::abort_on_exception, which ends the job when one rank throws. Every
/// collective waits at most DdpOptions::timeout seconds for the other ranks; then the
/// job ends with a message naming the collective, the training step and the ranks that
/// did not arrive (dist::Communicator).
///
/// Requirements: MPI initialised; the network outlives the wrapper and keeps its layers
/// (the wrapper holds pointers to its tensors); every rank calls every member that
/// communicates (constructor, forward_train, backward, average_gradients,
/// broadcast_state, agree) in the same order, with the same shapes.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "orepa/blocks/batch_norm.hpp"
#include "orepa/blocks/module.hpp"
#include "orepa/core/options.hpp"
#include "orepa/dist/communicator.hpp"

namespace orepa {

/// Options of DistributedDataParallel.
struct DdpOptions {
  /// @fn bucket_bytes(const std::int64_t&)
  /// @brief Sets bucket_bytes(); returns `*this` for chaining.
  /// @fn sync_batch_norm(const bool&)
  /// @brief Sets sync_batch_norm(); returns `*this` for chaining.
  /// @fn timeout(const double&)
  /// @brief Sets timeout(); returns `*this` for chaining.

  /// Gradient bytes per all-reduce (default 4 MiB: on shared memory the all-reduce
  /// bandwidth flattens from about 256 KB on, and a few buckets keep the call count low);
  /// a tensor larger than this gets a bucket of its own.
  OREPA_OPTION(std::int64_t, bucket_bytes) = std::int64_t(4) << 20;
  /// Synchronise every BatchNorm's training statistics across ranks (default true).
  OREPA_OPTION(bool, sync_batch_norm) = true;
  /// Seconds a rank waits in one collective for the others before the whole job is
  /// ended (MPI_Abort) with a message naming the collective, the training step and the
  /// ranks that did not arrive (default 300; > 0, infinity disables it). Raise it when
  /// one rank legitimately works alone for long between steps (evaluating, saving).
  OREPA_OPTION(double, timeout) = dist::default_timeout;

 public:
  /// This object (what the setters return).
  DdpOptions& self() { return *this; }
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
template <class List>
struct param_list_scalar;
template <class S>
struct param_list_scalar<std::vector<Param<S>*>> {
  using type = S;
};
}  // namespace detail
/// \endcond

/// Data-parallel training of `Net` across the ranks of an MPI communicator (see the file
/// comment). Not copyable or movable.
template <class Net>
class DistributedDataParallel {
 public:
  /// The network's scalar type (float or double).
  using Scalar = typename detail::param_list_scalar<decltype(std::declval<Net&>().parameters())>::type;

  /// Wraps `net` (collective over `comm`): checks that every rank has the same options
  /// and tensors, broadcasts rank 0's state, installs the BN reducers. Throws dist_error
  /// on every rank when the options or the networks differ, then config_error (on every
  /// rank, the options being equal) for bucket_bytes < 1 or timeout <= 0.
  explicit DistributedDataParallel(Net& net, DdpOptions opts = DdpOptions(), MPI_Comm comm = MPI_COMM_WORLD)
      : net_(net),
        opts_(opts),
        comm_(std::make_shared<dist::Communicator>(comm, opts.timeout() > 0 ? opts.timeout() : dist::default_timeout)) {
    comm_->check_same({{"bucket_bytes", std::to_string(opts_.bucket_bytes())},
                       {"sync_batch_norm", opts_.sync_batch_norm() ? "true" : "false"},
                       {"timeout", detail::cat(opts_.timeout())}},
                      "DistributedDataParallel: the options differ between ranks");
    if (opts_.bucket_bytes() < 1)
      throw config_error(detail::cat("DdpOptions::bucket_bytes: expected >= 1, got ", opts_.bucket_bytes()));
    if (!(opts_.timeout() > 0))
      throw config_error(detail::cat("DdpOptions::timeout: expected seconds > 0 (or infinity), got ", opts_.timeout()));
    Tensors<Scalar> t;
    net_.collect_tensors(t, "");
    check_same_network(t);
    for (auto& [name, p] : t.parameters) params_.push_back(p);
    for (auto& [name, p] : t.buffers) buffers_.push_back(p);
    for (auto& [prefix, bn] : t.batch_norms) {
      bns_.push_back(bn);
      bn_names_.push_back(prefix.empty() || prefix.back() != '.' ? prefix : prefix.substr(0, prefix.size() - 1));
    }
    make_buckets();
    broadcast_state();
    if (opts_.sync_batch_norm() && comm_->size() > 1) {
      // The reducer shares the communicator, so a BN copied out of the network stays
      // valid; its label names the BN in a timeout's message.
      for (std::size_t i = 0; i < bns_.size(); ++i)
        bns_[i]->set_cross_replica_sum([c = comm_, label = "SyncBatchNorm '" + bn_names_[i] + "'"](
                                           double* data, std::int64_t n) { c->sum(data, n, label); });
    }
  }
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;
  /// Removes the BN reducers: the network trains locally again.
  ~DistributedDataParallel() {
    for (auto* bn : bns_) bn->set_cross_replica_sum({});
  }

  /// This process's rank.
  int rank() const { return comm_->rank(); }
  /// Number of ranks.
  int size() const { return comm_->size(); }
  /// The wrapped network.
  Net& module() { return net_; }
  /// The communicator (a private duplicate of the one given).
  dist::Communicator& communicator() { return *comm_; }
  /// Elements of each gradient bucket, in the order they are reduced (last layer first).
  std::vector<std::int64_t> bucket_sizes() const {
    std::vector<std::int64_t> n;
    for (const auto& b : buckets_) n.push_back(std::int64_t(b.flat.size()));
    return n;
  }
  /// Seconds spent in MPI calls so far (BN statistics, gradients, checks).
  double communication_seconds() const { return comm_->communication_seconds(); }
  /// Training steps so far: the number of forward_train calls (messages name the step).
  std::int64_t steps() const { return steps_; }

  /// Training forward of this rank's share `x`. Throws dist_error on every rank when the
  /// ranks' input shapes differ.
  Tensor<Scalar> forward_train(ConstTensorView<Scalar> x) {
    comm_->set_step(++steps_);
    same_shape_everywhere(x.sizes(), "forward_train input");
    return net_.forward_train(x);
  }
  /// Eval forward (running statistics; local, no communication).
  Tensor<Scalar> forward_eval(ConstTensorView<Scalar> x) const { return net_.forward_eval(x); }
  /// Backward of the last forward_train for dL/d(output) (this rank's loss), then
  /// average_gradients(). Returns dL/dx of this rank's share. Throws dist_error on every
  /// rank when the ranks' gradient shapes differ.
  Tensor<Scalar> backward(ConstTensorView<Scalar> grad_out) {
    same_shape_everywhere(grad_out.sizes(), "backward grad_output");
    Tensor<Scalar> dx = net_.backward(grad_out);
    average_gradients();
    return dx;
  }

  /// Replaces every parameter's gradient by its mean over the ranks (bucketed
  /// all-reduce). backward() calls it; call it yourself after driving the network's
  /// backward directly (e.g. to accumulate several backward passes first).
  void average_gradients() {
    const Scalar scale = Scalar(1) / Scalar(comm_->size());
    for (auto& b : buckets_) {
      Scalar* out = b.flat.data();
      for (auto* p : b.params) out = std::copy(p->grad.begin(), p->grad.end(), out);
      comm_->sum(b.flat.data(), std::int64_t(b.flat.size()), b.label);
      const Scalar* in = b.flat.data();
      for (auto* p : b.params)
        for (auto& g : p->grad) g = *in++ * scale;
    }
  }

  /// Copies rank 0's parameters, buffers and BN counters to every rank (the constructor
  /// does; call it again after loading a checkpoint on rank 0 only).
  void broadcast_state() {
    std::vector<Scalar> flat;
    for (const auto* list : {&params_, &buffers_})
      for (auto* p : *list) flat.insert(flat.end(), p->value.begin(), p->value.end());
    std::vector<std::int64_t> counters;
    for (auto* bn : bns_) counters.push_back(bn->num_batches_tracked);
    comm_->broadcast(flat.data(), std::int64_t(flat.size()), 0, "broadcast_state parameters and buffers");
    comm_->broadcast(counters.data(), std::int64_t(counters.size()), 0, "broadcast_state BN counters");
    const Scalar* in = flat.data();
    for (const auto* list : {&params_, &buffers_})
      for (auto* p : *list) {
        std::copy(in, in + p->value.numel(), p->value.begin());
        in += p->value.numel();
      }
    for (std::size_t i = 0; i < bns_.size(); ++i) bns_[i]->num_batches_tracked = counters[i];
  }

  /// For user code between the wrapper's calls that may fail on one rank only: every rank
  /// calls agree() at the same point with the empty string, or with its error message;
  /// then every rank throws the same dist_error naming the failing ranks, or none does.
  void agree(const std::string& local_error) { comm_->agree(local_error, "DistributedDataParallel"); }

 private:
  struct Bucket {
    ParamList<Scalar> params;
    std::vector<Scalar> flat;  // allocated once: packed gradients, reduced in place
    std::string label;         // "gradient bucket i of n", for messages
  };

  // Reverse state-dict order: the last layers' gradients are complete first in backward,
  // the order an overlapping reduction would start them in.
  void make_buckets() {
    const auto per_bucket = std::max<std::int64_t>(1, opts_.bucket_bytes() / std::int64_t(sizeof(Scalar)));
    std::int64_t filled = 0;
    for (auto it = params_.rbegin(); it != params_.rend(); ++it) {
      const std::int64_t n = (*it)->value.numel();
      if (buckets_.empty() || (filled > 0 && filled + n > per_bucket)) {
        buckets_.emplace_back();
        filled = 0;
      }
      buckets_.back().params.push_back(*it);
      filled += n;
    }
    for (std::size_t i = 0; i < buckets_.size(); ++i) {
      auto& b = buckets_[i];
      std::int64_t n = 0;
      for (auto* p : b.params) n += p->value.numel();
      b.flat.resize(std::size_t(n));
      b.label = detail::cat("gradient bucket ", i + 1, " of ", buckets_.size());
    }
  }

  // One line per tensor: what every rank must have the same of.
  static std::vector<std::string> describe(const Tensors<Scalar>& t) {
    std::vector<std::string> lines;
    for (const auto& [n, p] : t.parameters) lines.push_back("parameter '" + n + "' " + shape_str(p->value.sizes()));
    for (const auto& [n, p] : t.buffers) lines.push_back("buffer '" + n + "' " + shape_str(p->value.sizes()));
    return lines;
  }

  // Before any other collective: a summary per rank (counts, elements, a hash of every
  // name and shape) all-gathered; on a difference, rank 0's list is broadcast and every
  // other rank reports its first difference through agree().
  void check_same_network(const Tensors<Scalar>& t) {
    const auto lines = describe(t);
    std::int64_t elements = 0;
    for (const auto* list : {&t.parameters, &t.buffers})
      for (const auto& [n, p] : *list) elements += p->value.numel();
    std::uint64_t hash = 1469598103934665603ull;  // FNV-1a over the lines
    for (const auto& l : lines)
      for (const char ch : l + "\n") hash = (hash ^ std::uint8_t(ch)) * 1099511628211ull;
    const std::vector<std::int64_t> mine{std::int64_t(t.parameters.size()), std::int64_t(t.buffers.size()),
                                         elements, std::int64_t(hash >> 1)};
    const auto all = comm_->all_gather(mine, "network summary");
    bool same = true;
    for (int r = 1; r < comm_->size(); ++r)
      for (std::size_t i = 0; i < mine.size(); ++i) same = same && all[std::size_t(r) * mine.size() + i] == all[i];
    if (same) return;

    std::string text;
    for (const auto& l : lines) text += l + "\n";
    std::int64_t len = std::int64_t(text.size());
    comm_->broadcast(&len, 1, 0, "network description length");
    std::string root(std::size_t(len), '\0');
    if (comm_->rank() == 0) root = text;
    comm_->broadcast(root.data(), len, 0, "network description");
    std::vector<std::string> root_lines;
    for (std::size_t b = 0, e; b < root.size(); b = e + 1) root_lines.push_back(root.substr(b, (e = root.find('\n', b)) - b));

    std::string error;  // stays empty on rank 0 and on ranks that match it
    if (!std::equal(mine.begin(), mine.end(), all.begin())) {
      error = detail::cat(t.parameters.size(), " parameters and ", t.buffers.size(), " buffers (", elements,
                          " values), rank 0 has ", all[0], " and ", all[1], " (", all[2], ")");
      for (std::size_t i = 0; i < std::max(lines.size(), root_lines.size()); ++i) {
        const std::string a = i < lines.size() ? lines[i] : "nothing", b = i < root_lines.size() ? root_lines[i] : "nothing";
        if (a != b) {
          error += detail::cat("; tensor ", i, " is ", a, " where rank 0 has ", b);
          break;
        }
      }
    }
    comm_->agree(error, "DistributedDataParallel: the network differs between ranks");
  }

  // All-gathers `s` (its rank and up to 8 extents) and throws on every rank if any
  // rank's differs from rank 0's.
  void same_shape_everywhere(const Shape& s, const char* what) {
    constexpr std::size_t kMax = 8;
    std::vector<std::int64_t> mine(kMax + 1, -1);
    mine[0] = std::int64_t(s.size());
    for (std::size_t i = 0; i < s.size() && i < kMax; ++i) mine[i + 1] = s[i];
    const auto all = comm_->all_gather(mine, std::string(what) + " shape");
    auto shape_of = [&](int r) {
      const std::int64_t* p = all.data() + std::size_t(r) * mine.size();
      return shape_str(Shape(p + 1, p + 1 + std::min<std::int64_t>(p[0], std::int64_t(kMax))));
    };
    std::string msg;
    for (int r = 1; r < comm_->size(); ++r)
      if (!std::equal(all.begin(), all.begin() + std::ptrdiff_t(mine.size()),
                      all.begin() + std::ptrdiff_t(std::size_t(r) * mine.size())))
        msg += detail::cat(" [rank ", r, "] ", what, " ", shape_of(r), " where rank 0 has ", shape_of(0), ";");
    if (msg.empty()) return;
    msg.pop_back();
    throw dist_error(detail::cat("DistributedDataParallel::", what, ": every rank must pass the same shape;", msg));
  }

  Net& net_;
  DdpOptions opts_;
  std::shared_ptr<dist::Communicator> comm_;
  ParamList<Scalar> params_, buffers_;
  std::vector<BatchNorm2d<Scalar>*> bns_;
  std::vector<std::string> bn_names_;  // state-dict prefixes, for messages
  std::vector<Bucket> buckets_;
  std::int64_t steps_ = 0;
};

}  // namespace orepa
