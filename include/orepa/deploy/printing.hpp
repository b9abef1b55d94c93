#pragma once
/// @file printing.hpp (deploy)
/// Printing of deployed modules, in the form of PyTorch's module repr with a parameter
/// count after each line (training-time modules: blocks/module_tree.hpp):
///
///     DeployedC3(  # 1344 parameters
///       (cv1): DeployedConv(16, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 136 parameters
///       (m.0.cv1): DeployedConv(8, 8, kernel_size=1, stride=1, padding=0, act=SiLU, fp32)  # 72 parameters
///       ...
///     )
///
/// A deployed module lists its convolutions under their tensor paths (visit_convs), the
/// names the int8 calibration uses.

#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "orepa/core/activation.hpp"
#include "orepa/core/conv_geometry.hpp"
#include "orepa/core/linkage.hpp"
#include "orepa/deploy/any_deployed.hpp"
#include "orepa/deploy/deployed_conv.hpp"

namespace orepa {

/// The printed name of an activation kind ("Identity", "ReLU", "SiLU", "Sigmoid", "custom").
inline const char* activation_label(ActivationKind k) {
  switch (k) {
    case ActivationKind::identity: return "Identity";
    case ActivationKind::relu: return "ReLU";
    case ActivationKind::silu: return "SiLU";
    case ActivationKind::sigmoid: return "Sigmoid";
    default: return "custom";
  }
}

/// A convolution's settings as printed: "I, O, kernel_size=k, stride=s, padding=p", then
/// dilation and groups when not 1, then "act=<activation>".
OREPA_INLINE std::string conv_repr(const ConvGeometry& g, ActivationKind act);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string conv_repr(const ConvGeometry& g, ActivationKind act) {
  std::string s = detail::cat(g.in_channels, ", ", g.out_channels, ", kernel_size=", g.kernel, ", stride=", g.stride,
                              ", padding=", g.padding);
  if (g.dilation != 1) s += detail::cat(", dilation=", g.dilation);
  if (g.groups != 1) s += detail::cat(", groups=", g.groups);
  return s + ", act=" + activation_label(act);
}
#endif  // OREPA_DEFINITIONS

/// \cond DO_NOT_DOCUMENT_THIS
namespace detail {
// "  # n parameters" after a printed line, nothing for a module without parameters.
OREPA_INLINE std::string parameter_note(std::int64_t n);
#if OREPA_DEFINITIONS
OREPA_INLINE std::string parameter_note(std::int64_t n) { return n ? cat("  # ", n, " parameters") : std::string(); }
#endif

template <class S>
std::string deployed_conv_line(const DeployedConv<S>& c) {
  return "DeployedConv(" + conv_repr(c.geometry(), c.activation().kind()) + ", " + precision_name(c.precision()) + ")" +
         parameter_note(c.num_parameters());
}

// Prints deployed module `d` (any type with visit_convs and num_parameters) called `type`
// from the current position of `os` (its label written), its convolutions indented by
// `indent` + 2, ending with a newline.
template <class S, class D>
void print_deployed_tree(std::ostream& os, const std::string& type, const D& d, int indent) {
  std::vector<std::pair<std::string, const DeployedConv<S>*>> convs;
  d.visit_convs("", [&](const std::string& name, const DeployedConv<S>& c) { convs.emplace_back(name, &c); });
  os << type << "(";
  if (convs.empty()) {
    os << ")" << parameter_note(d.num_parameters()) << "\n";
    return;
  }
  os << parameter_note(d.num_parameters()) << "\n";
  const std::string pad(std::size_t(indent + 2), ' ');
  for (const auto& [name, c] : convs)
    os << pad << "(" << name.substr(0, name.empty() ? 0 : name.size() - 1) << "): " << deployed_conv_line(*c) << "\n";
  os << std::string(std::size_t(indent), ' ') << ")\n";
}

// print_deployed_tree for a held stage; a deployed convolution on one line.
template <class S>
void print_deployed(std::ostream& os, const AnyDeployed<S>& d, int indent) {
  if (const auto* c = d.template target<DeployedConv<S>>()) os << deployed_conv_line(*c) << "\n";
  else print_deployed_tree<S>(os, d.type_name(), d, indent);
}
}  // namespace detail
/// \endcond

/// Prints a deployed convolution: geometry, activation, precision and parameter count.
template <class S>
std::ostream& operator<<(std::ostream& os, const DeployedConv<S>& c) {
  return os << detail::deployed_conv_line(c);
}

/// Prints a deployed module: its type and parameter count, and its convolutions under
/// their tensor paths, one per line.
template <class S>
std::ostream& operator<<(std::ostream& os, const AnyDeployed<S>& d) {
  std::ostringstream s;
  detail::print_deployed(s, d, 0);
  std::string text = s.str();
  text.pop_back();  // no newline after the closing line, as after a single-line form
  return os << text;
}

}  // namespace orepa
