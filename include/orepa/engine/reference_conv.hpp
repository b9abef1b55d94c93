#pragma once
/// @file reference_conv.hpp
/// A naive direct 2-D convolution (PyTorch conv2d semantics: cross-correlation, zero
/// padding, groups, stride, dilation) for any scalar type, with its two backward passes.
/// It is the independent computation tests compare oneDNN against (in double), and the
/// engine that blocks templated on a non-float scalar run on.

#include "orepa/core/conv_geometry.hpp"

namespace orepa::reference {

namespace detail_ref {
// Calls f(n, o, oh, ow, i_in_group_channel, ih, iw, c, weight_index_pair...) for every
// valid multiply-add of the convolution. All three passes share this one traversal.
template <class F>
void for_each_tap(const ConvGeometry& g, const Shape& xs, const Shape& ys, F&& f) {
  const std::int64_t N = xs[0], H = xs[2], W = xs[3], OH = ys[2], OW = ys[3];
  const std::int64_t Ig = g.in_per_group(), Og = g.out_per_group(), k = g.kernel;
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t o = 0; o < g.out_channels; ++o) {
      const std::int64_t grp = o / Og;
      for (std::int64_t i = 0; i < Ig; ++i) {
        const std::int64_t c = grp * Ig + i;
        for (std::int64_t kh = 0; kh < k; ++kh)
          for (std::int64_t kw = 0; kw < k; ++kw)
            for (std::int64_t oh = 0; oh < OH; ++oh) {
              const std::int64_t ih = oh * g.stride - g.padding + kh * g.dilation;
              if (ih < 0 || ih >= H) continue;
              for (std::int64_t ow = 0; ow < OW; ++ow) {
                const std::int64_t iw = ow * g.stride - g.padding + kw * g.dilation;
                if (iw < 0 || iw >= W) continue;
                f(((n * g.out_channels + o) * OH + oh) * OW + ow,  // y index
                  ((n * g.in_channels + c) * H + ih) * W + iw,     // x index
                  ((o * Ig + i) * k + kh) * k + kw);               // w index
              }
            }
      }
    }
}
}  // namespace detail_ref

/// y = conv(x, w) (+ bias[o] when bias is non-empty). x [N,I,H,W], w [O,I/g,k,k].
/// Tensors or views of the same scalar S for every argument.
template <class X, class W, class S = typename X::Scalar>
Tensor<S> conv2d(const X& x_, const W& w_, const ConvGeometry& g, orepa::detail::identity_t<ConstTensorView<S>> bias = {}) {
  Tensor<S> xc;
  const ConstTensorView<S> x = contiguous<S>(x_, xc), w = w_;
  g.validate("reference::conv2d", false);
  w.expect_shape(g.weight_shape(), "reference::conv2d weight");
  Tensor<S> y(g.output_shape(x.sizes(), "reference::conv2d"));
  if (!bias.empty()) {
    bias.expect_shape({g.out_channels}, "reference::conv2d bias");
    const std::int64_t plane = y.size(2) * y.size(3);
    for (std::int64_t j = 0; j < y.numel(); ++j) y[j] = bias[(j / plane) % g.out_channels];
  }
  detail_ref::for_each_tap(g, x.sizes(), y.sizes(),
                           [&](std::int64_t yi, std::int64_t xi, std::int64_t wi) { y[yi] += x[xi] * w[wi]; });
  return y;
}

/// dL/dx given dL/dy, for an input of shape `x_shape`.
template <class D, class W, class S = typename D::Scalar>
Tensor<S> conv2d_backward_data(const D& dy_, const W& w_, const ConvGeometry& g, const Shape& x_shape) {
  Tensor<S> dyc;
  const ConstTensorView<S> dy = contiguous<S>(dy_, dyc), w = w_;
  dy.expect_shape(g.output_shape(x_shape, "reference::conv2d_backward_data"),
                  "reference::conv2d_backward_data grad_output");
  Tensor<S> dx(x_shape);
  detail_ref::for_each_tap(g, x_shape, dy.sizes(),
                           [&](std::int64_t yi, std::int64_t xi, std::int64_t wi) { dx[xi] += dy[yi] * w[wi]; });
  return dx;
}

/// dL/dw given the input and dL/dy.
template <class X, class D, class S = typename X::Scalar>
Tensor<S> conv2d_backward_weights(const X& x_, const D& dy_, const ConvGeometry& g) {
  Tensor<S> xc, dyc;
  const ConstTensorView<S> x = contiguous<S>(x_, xc), dy = contiguous<S>(dy_, dyc);
  dy.expect_shape(g.output_shape(x.sizes(), "reference::conv2d_backward_weights"),
                  "reference::conv2d_backward_weights grad_output");
  Tensor<S> dw(g.weight_shape());
  detail_ref::for_each_tap(g, x.sizes(), dy.sizes(),
                           [&](std::int64_t yi, std::int64_t xi, std::int64_t wi) { dw[wi] += dy[yi] * x[xi]; });
  return dw;
}

}  // namespace orepa::reference
