// Torch-free C launcher of the tensor-core 3x3x3 "same" convolution (kernels/conv3x3.cu): stride 1,
// padding = dilation, no bias, 32 input and 32 output channels, bf16 or fp16 data, float32 accumulation.
//
// Layout: x and y are channels-last volumes, element (n, z, h, w, c) at
//   n * sample_stride + ((z * H + h) * W + w) * voxel_stride + c,
// so a channel slice of a wider channels-last buffer is accepted (voxel_stride = the buffer's channels).
// weight is packed [27 taps (kd, kh, kw)][32 output channels][32 input channels], contiguous.
// The input gradient of the same convolution is this convolution of the output gradient with the weight
// flipped along the three kernel axes and its channel axes swapped: pass the weight packed as
// [27 taps][32 input channels][32 output channels] and flip_taps = 1 (the kernel reads tap 26 - t for t).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

extern "C" {

enum hmedn_conv3x3_dtype { HMEDN_CONV_BF16 = 0, HMEDN_CONV_FP16 = 1 };

struct hmedn_conv3x3_args {
  const void* x;            // input, 16-byte aligned, voxel_stride a multiple of 8
  const void* weight;       // packed weight, 16-byte aligned
  void* y;                  // output, 4-byte aligned, voxel_stride even
  int64_t batch, depth, height, width;
  int64_t x_sample_stride, x_voxel_stride;  // in elements
  int64_t y_sample_stride, y_voxel_stride;
  int dilation;             // 1 .. hmedn_conv3x3_max_dilation()
  int dtype;                // hmedn_conv3x3_dtype
  int flip_taps;            // 1: use tap 26 - t of the packed weight for tap t
  int accumulate;           // 1: y += the convolution (y's values are read, added in float32, rounded once)
  int tile_rows;            // 8, 16 or 32: each block's output tile is tile_rows x 16 voxels of one plane; 8 = the
                            // column kernel (sm_90a images: hmedn_conv3x3_column_runs_on_current_device)
  int multiprocessors;      // the device's SM count (sizes the column kernel's grid; needed for tile_rows 8)
  // null, or float32 (batch, depth * (height / tile_rows) * (width / 16), 2, 32) contiguous: for each block's
  // tile_rows x 16 output tile of one plane (row (n * depth + z) * tiles + tile, tiles row-major), the mean and the
  // sum of squared deviations (M2) of each output channel over the tile's outputs as stored (rounded). Needs height
  // a multiple of tile_rows and width of 16 (every tile full) and accumulate 0.
  float* stats;
};

// Weight gradient of the same convolution: part[split][tap][co][ci] (float32, (splits, 27, 32, 32) contiguous)
// holds each split's partial sums over the voxels; the gradient (27, 32 out, 32 in) is their sum over split.
// x is the convolution's input, grad its output gradient (same layout contract as x above).
struct hmedn_conv3x3_wgrad_args {
  const void* x;
  const void* grad;
  float* part;
  int64_t batch, depth, height, width;
  int64_t x_sample_stride, x_voxel_stride;
  int64_t grad_sample_stride, grad_voxel_stride;
  int dilation;
  int dtype;
  int splits;               // 1 .. 65535: blocks per kernel depth
};

cudaError_t hmedn_conv3x3_wgrad_cuda(const hmedn_conv3x3_wgrad_args* args, cudaStream_t stream);

// Largest dilation the kernels take (template instances).
int hmedn_conv3x3_max_dilation(void);

// 1 when this build holds the column kernel (tile_rows 8: output planes d apart share each input plane's copy and
// all three kernel depths run as one wgmma) for the current device, else 0.
int hmedn_conv3x3_column_runs_on_current_device(void);

// 1 when this build holds kernel images the current device can run (e.g. 0 on a GPU newer than the build's
// architectures), else 0.
int hmedn_conv3x3_runs_on_current_device(void);

// cudaErrorInvalidValue for arguments outside the contract above, else the launch's error.
cudaError_t hmedn_conv3x3_cuda(const hmedn_conv3x3_args* args, cudaStream_t stream);

}  // extern "C"
