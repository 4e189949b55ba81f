// Fused CPU kernels for the mLSTM's per-step gate math (see kernels.py; `make setup` builds them).
//
// One recurrent step is two dependent matmuls and, between them, about a dozen elementwise ops on
// [batch, hidden] tensors. TensorFlow runs each as its own kernel, reading and writing memory each
// time; these two kernels do a step's gate math, and its gradient, in one pass per row.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace {

using tensorflow::int64;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
namespace shape_inference = tensorflow::shape_inference;

using ArrayF = Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, 1>>;
using OutF = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, 1>>;
template <typename T>
using ArrayT = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
template <typename T>
using OutT = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;

// Runs work(first_row, end_row) over `rows` rows on TensorFlow's intra-op threads.
template <typename Work>
void ForRows(OpKernelContext* ctx, int64 rows, int64 cost_per_row, Work work) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(pool->num_threads, pool->workers, rows, cost_per_row, work);
}

bool IsMatrix(const Tensor& t, int64 rows, int64 cols) {
  return t.dims() == 2 && t.dim_size(0) == rows && t.dim_size(1) == cols;
}

// The shapes MlstmGates reads: c [B, n], xz [B, >= 4n] (the model passes whole projection rows) and
// mz [B, 4n].
tensorflow::Status CheckGateInputs(const Tensor& xz, const Tensor& mz, const Tensor& c) {
  if (c.dims() != 2) return InvalidArgument("c must be [batch, hidden], got ", c.shape().DebugString());
  const int64 B = c.dim_size(0), n = c.dim_size(1);
  if (xz.dims() == 2 && xz.dim_size(0) == B && xz.dim_size(1) >= 4 * n && IsMatrix(mz, B, 4 * n)) {
    return tensorflow::OkStatus();
  }
  return InvalidArgument("xz must be [", B, ", >= ", 4 * n, "] and mz [", B, ", ", 4 * n, "], got ",
                         xz.shape().DebugString(), " and ", mz.shape().DebugString());
}

}  // namespace

REGISTER_OP("MlstmGates")
    .Attr("T: {float, bfloat16, half}")
    .Input("xz: T")  // x W_x + b for this step, [B, >= 4n]: gates i, f, o, u in the first 4n columns
    .Input("mz: T")  // m W_h, [B, 4n]
    .Input("c: float")
    .Output("saved: float")  // [B, 6n]: i, f, o, u, c (the input), tanh(c_new): what the backward step reads
    .Output("c_new: float")
    .Output("h: float")
    .Output("h_compute: T")  // h in the compute dtype, for the next step's matmul
    .SetShapeFn([](shape_inference::InferenceContext* ctx) {
      shape_inference::ShapeHandle c;
      shape_inference::DimensionHandle six_n;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(2), 2, &c));
      TF_RETURN_IF_ERROR(ctx->Multiply(ctx->Dim(c, 1), 6, &six_n));
      ctx->set_output(0, ctx->Matrix(ctx->Dim(c, 0), six_n));
      for (int k = 1; k < 4; ++k) ctx->set_output(k, c);
      return tensorflow::OkStatus();
    });

template <typename T>
class MlstmGatesOp : public OpKernel {
 public:
  explicit MlstmGatesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &xz = ctx->input(0), &mz = ctx->input(1), &c = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckGateInputs(xz, mz, c));
    const int64 B = c.dim_size(0), n = c.dim_size(1);
    const int64 x_stride = xz.dim_size(1);  // the model passes the whole projection row, x_m included
    Tensor* out[4];
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, 6 * n}), &out[0]));
    for (int k = 1; k < 4; ++k) OP_REQUIRES_OK(ctx, ctx->allocate_output(k, c.shape(), &out[k]));
    const T* X = xz.flat<T>().data();
    const T* M = mz.flat<T>().data();
    const float* C = c.flat<float>().data();
    float* S = out[0]->flat<float>().data();
    ForRows(ctx, B, 40 * n, [&](int64 first, int64 end) {
      for (int64 r = first; r < end; ++r) {
        const T *x = X + r * x_stride, *m = M + r * 4 * n;
        float* s = S + r * 6 * n;
        const int64 k = r * n;
        auto z = [&](int gate) {  // pre-activation in float32
          return ArrayT<T>(x + gate * n, n).template cast<float>() + ArrayT<T>(m + gate * n, n).template cast<float>();
        };
        OutF i(s, n), f(s + n, n), o(s + 2 * n, n), u(s + 3 * n, n), c_prev(s + 4 * n, n), tanh_c(s + 5 * n, n),
            c_new(out[1]->flat<float>().data() + k, n), h(out[2]->flat<float>().data() + k, n);
        i = z(0).logistic();
        f = z(1).logistic();
        o = z(2).logistic();
        u = z(3).tanh();
        c_prev = ArrayF(C + k, n);
        c_new = f * c_prev + i * u;
        tanh_c = c_new.tanh();
        h = o * tanh_c;
        OutT<T>(out[3]->flat<T>().data() + k, n) = h.template cast<T>();
      }
    });
  }
};

REGISTER_OP("MlstmGatesGrad")
    .Attr("T: {float, bfloat16, half}")
    .Input("d_h: T")       // from step t+1 through the recurrent matmul, in its output dtype
    .Input("d_hs: float")  // from this step's output
    .Input("d_c: float")   // from step t+1
    .Input("saved: float")  // [B, 6n], MlstmGates' first output for this step
    .Output("d_z: T")          // [B, 4n], for the matmuls
    .Output("d_c_prev: float")  // to step t-1
    .SetShapeFn([](shape_inference::InferenceContext* ctx) {
      shape_inference::ShapeHandle d_h;
      shape_inference::DimensionHandle four_n;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 2, &d_h));
      TF_RETURN_IF_ERROR(ctx->Multiply(ctx->Dim(d_h, 1), 4, &four_n));
      ctx->set_output(0, ctx->Matrix(ctx->Dim(d_h, 0), four_n));
      ctx->set_output(1, d_h);
      return tensorflow::OkStatus();
    });

template <typename T>
class MlstmGatesGradOp : public OpKernel {
 public:
  explicit MlstmGatesGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& first = ctx->input(0);
    OP_REQUIRES(ctx, first.dims() == 2, InvalidArgument("d_h must be [batch, hidden], got ", first.shape().DebugString()));
    const int64 B = first.dim_size(0), n = first.dim_size(1);
    for (int k = 1; k < 4; ++k) {
      const int64 cols = k == 3 ? 6 * n : n;
      OP_REQUIRES(ctx, IsMatrix(ctx->input(k), B, cols),
                  InvalidArgument("input ", k, " must be [", B, ", ", cols, "], got ", ctx->input(k).shape().DebugString()));
    }
    const T* DH = first.flat<T>().data();
    const float *DHS = ctx->input(1).flat<float>().data(), *DCIN = ctx->input(2).flat<float>().data(),
                *S = ctx->input(3).flat<float>().data();
    Tensor *d_z_out, *d_c_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({B, 4 * n}), &d_z_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({B, n}), &d_c_out));
    T* DZ = d_z_out->flat<T>().data();
    float* DC = d_c_out->flat<float>().data();
    ForRows(ctx, B, 40 * n, [&](int64 first_row, int64 end) {
      for (int64 r = first_row; r < end; ++r) {
        const int64 k = r * n;
        const float* s = S + r * 6 * n;
        ArrayF i(s, n), f(s + n, n), o(s + 2 * n, n), u(s + 3 * n, n), c_prev(s + 4 * n, n), tanh_c(s + 5 * n, n);
        const auto d_h = ArrayT<T>(DH + k, n).template cast<float>() + ArrayF(DHS + k, n);
        OutF d_c(DC + k, n);  // the step's whole d_c first, then d_c * f for step t-1
        T* d_z = DZ + r * 4 * n;
        d_c = ArrayF(DCIN + k, n) + d_h * o * (1.0f - tanh_c * tanh_c);
        OutT<T>(d_z, n) = (d_c * u * i * (1.0f - i)).template cast<T>();
        OutT<T>(d_z + n, n) = (d_c * c_prev * f * (1.0f - f)).template cast<T>();
        OutT<T>(d_z + 2 * n, n) = (d_h * tanh_c * o * (1.0f - o)).template cast<T>();
        OutT<T>(d_z + 3 * n, n) = (d_c * i * (1.0f - u * u)).template cast<T>();
        d_c = d_c * f;
      }
    });
  }
};

REGISTER_OP("MlstmRead")
    .Attr("T: {float, bfloat16, half}")
    .Input("table: T")        // [V, >= 4n]: each byte's input projections (gates i, f, o, u first), bias included
    .Input("ids: int32")      // [B]: the byte each row reads at this step, a row of table
    .Input("mz: T")           // m W_h, [B, 4n]
    .Input("c: float")
    .Input("h: float")
    .Input("total: float")    // sum of the row's hidden states so far (in the compute dtype's precision)
    .Input("peak: float")     // their elementwise maximum
    .Input("lengths: int32")  // [B]: row r reads steps t < lengths[r]; after that its state stays as it is
    .Input("t: int32")        // this step
    .Output("c_new: float")
    .Output("h_new: float")
    .Output("h_compute: T")
    .Output("total_new: float")
    .Output("peak_new: float")
    .SetShapeFn([](shape_inference::InferenceContext* ctx) {
      for (int k = 0; k < 5; ++k) ctx->set_output(k, ctx->input(3));
      return tensorflow::OkStatus();
    });

// MlstmGates for featurising: the step's gate math without what a backward step would read, the
// running sum and maximum of the hidden states updated in the same pass (so the loop keeps no
// per-step outputs), and rows past their length left unchanged. Each row's input projections are
// read from the byte table (256 rows: 1.3 MB at hidden 512 in bf16, it stays in cache) by its byte
// id: the per-step projections of a piece are never gathered into one [time, batch, 5n] tensor,
// which streamed from memory at each step. Each output may reuse its input's buffer: every value
// depends only on the same position of the inputs.
template <typename T>
class MlstmReadOp : public OpKernel {
 public:
  explicit MlstmReadOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor &table = ctx->input(0), &ids = ctx->input(1), &mz = ctx->input(2), &c = ctx->input(3),
                 &lengths = ctx->input(7);
    OP_REQUIRES(ctx, c.dims() == 2, InvalidArgument("c must be [batch, hidden], got ", c.shape().DebugString()));
    const int64 B = c.dim_size(0), n = c.dim_size(1);
    OP_REQUIRES(ctx, table.dims() == 2 && table.dim_size(1) >= 4 * n && IsMatrix(mz, B, 4 * n),
                InvalidArgument("table must be [bytes, >= ", 4 * n, "] and mz [", B, ", ", 4 * n, "], got ",
                                table.shape().DebugString(), " and ", mz.shape().DebugString()));
    for (int k = 4; k < 7; ++k) {
      OP_REQUIRES(ctx, IsMatrix(ctx->input(k), B, n),
                  InvalidArgument("input ", k, " must be [", B, ", ", n, "], got ", ctx->input(k).shape().DebugString()));
    }
    for (int k : {1, 7}) {
      OP_REQUIRES(ctx, ctx->input(k).dims() == 1 && ctx->input(k).dim_size(0) == B,
                  InvalidArgument(k == 1 ? "ids" : "lengths", " must be [", B, "], got ",
                                  ctx->input(k).shape().DebugString()));
    }
    const int32_t* I = ids.flat<int32_t>().data();
    for (int64 r = 0; r < B; ++r) {
      OP_REQUIRES(ctx, I[r] >= 0 && I[r] < table.dim_size(0),
                  InvalidArgument("ids[", r, "] = ", I[r], " is not a row of the table [0, ", table.dim_size(0), ")"));
    }
    const int64 x_stride = table.dim_size(1);
    const int32_t t = ctx->input(8).scalar<int32_t>()();
    Tensor* out[5];
    const int from[5] = {3, 4, -1, 5, 6};  // the input whose buffer each output may take over
    for (int k = 0; k < 5; ++k) {
      if (from[k] < 0) {
        OP_REQUIRES_OK(ctx, ctx->allocate_output(k, c.shape(), &out[k]));
      } else {
        OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({from[k]}, k, c.shape(), &out[k]));
      }
    }
    const T* X = table.flat<T>().data();
    const T* M = mz.flat<T>().data();
    const float *C = c.flat<float>().data(), *H = ctx->input(4).flat<float>().data(),
                *TOTAL = ctx->input(5).flat<float>().data(), *PEAK = ctx->input(6).flat<float>().data();
    const int32_t* L = lengths.flat<int32_t>().data();
    ForRows(ctx, B, 30 * n, [&](int64 first, int64 end) {
      for (int64 r = first; r < end; ++r) {
        const int64 k = r * n;
        OutF c_new(out[0]->flat<float>().data() + k, n), h(out[1]->flat<float>().data() + k, n),
            total(out[3]->flat<float>().data() + k, n), peak(out[4]->flat<float>().data() + k, n);
        OutT<T> h_compute(out[2]->flat<T>().data() + k, n);
        if (t >= L[r]) {  // past the row's last byte: everything as it was (a no-op where forwarded)
          c_new = ArrayF(C + k, n);
          h = ArrayF(H + k, n);
          total = ArrayF(TOTAL + k, n);
          peak = ArrayF(PEAK + k, n);
          h_compute = h.template cast<T>();
          continue;
        }
        const T *x = X + I[r] * x_stride, *m = M + r * 4 * n;
        auto z = [&](int gate) {
          return ArrayT<T>(x + gate * n, n).template cast<float>() + ArrayT<T>(m + gate * n, n).template cast<float>();
        };
        c_new = z(1).logistic() * ArrayF(C + k, n) + z(0).logistic() * z(3).tanh();
        h = z(2).logistic() * c_new.tanh();
        h_compute = h.template cast<T>();
        // The sum and maximum of the hidden state as the next matmul reads it (model.MLSTM.read).
        total = ArrayF(TOTAL + k, n) + h_compute.template cast<float>();
        peak = ArrayF(PEAK + k, n).max(h_compute.template cast<float>());
      }
    });
  }
};

#define REGISTER(T)                                                                                        \
  REGISTER_KERNEL_BUILDER(Name("MlstmGates").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),     \
                          MlstmGatesOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(Name("MlstmGatesGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
                          MlstmGatesGradOp<T>);                                                            \
  REGISTER_KERNEL_BUILDER(Name("MlstmRead").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),      \
                          MlstmReadOp<T>);
REGISTER(float)
REGISTER(tensorflow::bfloat16)
REGISTER(Eigen::half)
