#pragma once
/// @file module_tree.hpp
/// The module tree: printing (`std::cout << net`) and `named_modules()`, written once for
/// every block and layer. A module tells two things about itself, both optional:
///
///     std::string extra_repr() const;              // its settings: "16, 32, n=1, hidden=16"
///     void visit_children(ModuleVisitor<S>& v);    // v("cv1", cv1_); v("m.0", m_[0]); ...
///
/// children named by their state-dict path below the module (so full names are the
/// tensor prefixes: "3.m.0.cv1"). A module with a geometry() and an activation() (every
/// block) prints its convolution without writing extra_repr; a type that cannot get the
/// members specializes ModuleTraits. The printed form is PyTorch's module repr with the
/// number of trainable values (parameters) of each module after its line:
///
///     Sequential(  # 6256 parameters
///       (0): OREPA(3, 16, kernel_size=3, stride=2, padding=1, act=SiLU)  # 2005 parameters
///       (1): C3(  # 4251 parameters
///         16, 16, n=1, hidden=8
///         (cv1): OREPA_1x1(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU)  # 344 parameters
///         ...
///       )
///     )

#include <functional>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "orepa/blocks/module.hpp"
#include "orepa/deploy/printing.hpp"

namespace orepa {

template <class S>
class ModuleRef;

/// What a module's visit_children calls once per child, in state-dict order.
template <class S>
class ModuleVisitor {
 public:
  /// Called with each child module and its name below the parent.
  using OnModule = std::function<void(const std::string& name, const ModuleRef<S>& child)>;
  /// Called with a graph node that is no object (a model's Concat): its name, type and settings.
  using OnNode = std::function<void(const std::string& name, const std::string& type, const std::string& extra)>;
  /// A visitor calling `on_module` for children and `on_node` (if given) for object-less nodes.
  explicit ModuleVisitor(OnModule on_module, OnNode on_node = {})
      : on_module_(std::move(on_module)), on_node_(std::move(on_node)) {}
  /// Visits child `child` (any module; an AnyBlock stands for the block it holds) called `name`.
  template <class M>
  void operator()(const std::string& name, M& child) {
    on_module_(name, ModuleRef<S>(child));
  }
  /// Visits a node without an object (printed, not listed by named_modules).
  void node(const std::string& name, const std::string& type, const std::string& extra) {
    if (on_node_) on_node_(name, type, extra);
  }

 private:
  OnModule on_module_;
  OnNode on_node_;
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
template <class M, class = void>
struct has_extra_repr : std::false_type {};
template <class M>
struct has_extra_repr<M, std::void_t<decltype(std::string(std::declval<const M&>().extra_repr()))>> : std::true_type {};
template <class M, class = void>
struct has_conv_settings : std::false_type {};
template <class M>
struct has_conv_settings<M, std::void_t<decltype(std::declval<const M&>().geometry().kernel),
                                        decltype(std::declval<const M&>().activation())>> : std::true_type {};
template <class M, class S, class = void>
struct has_visit_children : std::false_type {};
template <class M, class S>
struct has_visit_children<M, S, std::void_t<decltype(std::declval<M&>().visit_children(std::declval<ModuleVisitor<S>&>()))>>
    : std::true_type {};
template <class M, class S, class = void>
struct has_module_ref : std::false_type {};
template <class M, class S>
struct has_module_ref<M, S, std::void_t<decltype(ModuleRef<S>(std::declval<M&>().module_ref()))>> : std::true_type {};
template <class A, class = void>
struct has_static_kind : std::false_type {};
template <class A>
struct has_static_kind<A, std::void_t<decltype(A::kind)>> : std::true_type {};

// The kind of activation `a`: a functor's static `kind`, or AnyActivation's kind().
template <class A>
ActivationKind activation_kind_of(const A& a) {
  if constexpr (has_static_kind<A>::value) return A::kind;
  else return a.kind();
}
}  // namespace detail
/// \endcond

/// How the module tree sees a module type `M`: its extra_repr() and visit_children()
/// members when it has them (and for a block, its convolution). Specialize it for a type
/// that cannot get the members.
template <class M, class = void>
struct ModuleTraits {
  /// The settings printed after the type name.
  static std::string extra_repr(const M& m) {
    if constexpr (detail::has_extra_repr<M>::value) return m.extra_repr();
    else if constexpr (detail::has_conv_settings<M>::value)
      return conv_repr(m.geometry(), detail::activation_kind_of(m.activation()));
    else return std::string();
  }
  /// Calls `v` on each child (none for a module without visit_children).
  template <class S>
  static void visit_children(M& m, ModuleVisitor<S>& v) {
    if constexpr (detail::has_visit_children<M, S>::value) m.visit_children(v);
  }
};

/// A non-owning reference to a module of any type, as named_modules() lists them: its
/// type name, settings, children and parameter count, and the module itself (target<T>()).
/// Valid as long as the module.
template <class S>
class ModuleRef {
 public:
  /// Refers to `m` (for an AnyBlock: to the block it holds).
  template <class M, class = std::enable_if_t<!std::is_same_v<std::decay_t<M>, ModuleRef>>>
  explicit ModuleRef(M& m) {
    if constexpr (detail::has_module_ref<M, S>::value) {
      *this = m.module_ref();
    } else {
      p_ = &m;
      ops_ = ops_for<M>();
    }
  }

  /// The module's type_name() ("OREPA", "C3").
  std::string type_name() const { return ops_->type_name(p_); }
  /// The settings printed after the type name (ModuleTraits::extra_repr).
  std::string extra_repr() const { return ops_->extra_repr(p_); }
  /// Calls `v` on each child, in state-dict order.
  void visit_children(ModuleVisitor<S>& v) const { ops_->visit(p_, v); }
  /// Number of trainable values (elements of parameters(), the module's and its children's).
  std::int64_t num_parameters() const {
    Tensors<S> t;
    ops_->collect(p_, t);
    std::int64_t n = 0;
    for (const auto& [name, p] : t.parameters) n += p->value.numel();
    return n;
  }
  /// The module's C++ type.
  const std::type_info& type() const { return ops_->type(); }
  /// The module as a `T` (its exact type), or nullptr when it is of another type.
  template <class T>
  T* target() const {
    return type() == typeid(T) ? static_cast<T*>(p_) : nullptr;
  }

 private:
  struct Ops {
    std::string (*type_name)(void*);
    std::string (*extra_repr)(void*);
    void (*visit)(void*, ModuleVisitor<S>&);
    void (*collect)(void*, Tensors<S>&);
    const std::type_info& (*type)();
  };
  template <class M>
  static const Ops* ops_for() {
    static const Ops ops{[](void* p) { return std::string(static_cast<M*>(p)->type_name()); },
                         [](void* p) { return ModuleTraits<M>::extra_repr(*static_cast<M*>(p)); },
                         [](void* p, ModuleVisitor<S>& v) { ModuleTraits<M>::visit_children(*static_cast<M*>(p), v); },
                         [](void* p, Tensors<S>& t) { static_cast<M*>(p)->collect_tensors(t, ""); },
                         []() -> const std::type_info& { return typeid(M); }};
    return &ops;
  }

  void* p_ = nullptr;
  const Ops* ops_ = nullptr;
};

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// True when M's collect_tensors takes Tensors<S>.
template <class M, class S, class = void>
struct collects : std::false_type {};
template <class M, class S>
struct collects<M, S, std::void_t<decltype(std::declval<M&>().collect_tensors(std::declval<Tensors<S>&>(), std::string()))>>
    : std::true_type {};
// The scalar of a module type (what its collect_tensors takes); absent for other types.
template <class M, class = void>
struct module_scalar {};
template <class M>
struct module_scalar<M, std::enable_if_t<collects<M, float>::value || collects<M, double>::value>> {
  using type = std::conditional_t<collects<M, float>::value, float, double>;
};

template <class S>
void collect_named_modules(const std::string& name, const ModuleRef<S>& m,
                           std::vector<std::pair<std::string, ModuleRef<S>>>& out) {
  out.emplace_back(name, m);
  ModuleVisitor<S> v([&](const std::string& child, const ModuleRef<S>& c) {
    collect_named_modules(name.empty() ? child : name + "." + child, c, out);
  });
  m.visit_children(v);
}

// Prints `m` from the current position of `os` (its label written), children indented by
// `indent` + 2, ending with a newline.
template <class S>
void print_module(std::ostream& os, const ModuleRef<S>& m, int indent) {
  struct Child {
    std::string name;
    std::optional<ModuleRef<S>> module;
    std::string type, extra;
  };
  std::vector<Child> children;
  ModuleVisitor<S> v([&](const std::string& name, const ModuleRef<S>& c) { children.push_back({name, c, "", ""}); },
                     [&](const std::string& name, const std::string& type, const std::string& extra) {
                       children.push_back({name, std::nullopt, type, extra});
                     });
  m.visit_children(v);
  const std::string extra = m.extra_repr(), note = parameter_note(m.num_parameters());
  if (children.empty()) {
    os << m.type_name() << "(" << extra << ")" << note << "\n";
    return;
  }
  const std::string pad(std::size_t(indent + 2), ' ');
  os << m.type_name() << "(" << note << "\n";
  if (!extra.empty()) os << pad << extra << "\n";
  for (const auto& c : children) {
    os << pad << "(" << c.name << "): ";
    if (c.module) print_module(os, *c.module, indent + 2);
    else os << c.type << "(" << c.extra << ")\n";
  }
  os << std::string(std::size_t(indent), ' ') << ")\n";
}
}  // namespace detail
/// \endcond

/// Every module of the tree rooted at `m`, `m` itself first (named ""), then depth-first
/// in state-dict order, each named by its path: the prefix of its tensors without the
/// last dot ("3", "3.cv1", "3.m.0", "3.m.0.cv1"). The references are valid as long as `m`.
template <class M, class S = typename detail::module_scalar<M>::type>
std::vector<std::pair<std::string, ModuleRef<S>>> named_modules(M& m) {
  std::vector<std::pair<std::string, ModuleRef<S>>> out;
  detail::collect_named_modules(std::string(), ModuleRef<S>(m), out);
  return out;
}

/// Prints module `m` as PyTorch prints a module: type and settings (channels, kernel,
/// stride, padding, groups, activation), children indented and named by their path, and
/// after each line the number of trainable values (see the file comment).
template <class M, class S = typename detail::module_scalar<M>::type>
std::ostream& operator<<(std::ostream& os, const M& m) {
  std::ostringstream s;
  detail::print_module(s, ModuleRef<S>(const_cast<M&>(m)), 0);  // reading only: ModuleRef's members are const
  std::string text = s.str();
  text.pop_back();  // no newline after the closing line, as after a single-line form
  return os << text;
}

}  // namespace orepa
