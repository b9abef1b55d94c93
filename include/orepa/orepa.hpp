#pragma once
/// @file orepa.hpp
/// Umbrella header: includes the whole public API of orepa.

#include "orepa/version.hpp"
#include "orepa/core/activation.hpp"
#include "orepa/core/error.hpp"
#include "orepa/core/param.hpp"
#include "orepa/core/random.hpp"
#include "orepa/core/tensor.hpp"
#include "orepa/engine/reference_conv.hpp"
#include "orepa/engine/conv.hpp"
#include "orepa/engine/batch_norm.hpp"
#include "orepa/branches/branch.hpp"
#include "orepa/branches/orepa_branches.hpp"
#include "orepa/deploy/deployed_conv.hpp"
#include "orepa/blocks/options.hpp"
#include "orepa/blocks/online_block.hpp"
#include "orepa/blocks/orepa.hpp"
