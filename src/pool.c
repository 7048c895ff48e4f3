/* Mean pooling (compression): launches cl/pool.cl. */
#include "internal.h"

clnsa_status pool_enqueue(clnsa_context *ctx, const nsa_dims *d, const clnsa_tensor *k,
                          const clnsa_tensor *v, const clnsa_tensor *k_cmp,
                          const clnsa_tensor *v_cmp, enqueue_chain *c) {
  build_options o = {{0}, 0};
  options_add(&o, "-DBS=%d -DDK=%d -DDV=%d", d->BS, d->DK, d->DV);
  options_add_dtype(&o, "K", k);
  options_add_dtype(&o, "V", v);
  options_add_dtype(&o, "KC", k_cmp);
  options_add_dtype(&o, "VC", v_cmp);
  tuning_env_override(&o);
  cl_kernel kern;
  CHECK_STATUS(program_kernel(ctx, "pool.cl", o.text, "pool_mean", &kern));
  cl_uint arg = 0;
  cl_int err = tensor_set_args(kern, &arg, k);
  err |= tensor_set_args(kern, &arg, v);
  err |= tensor_set_args(kern, &arg, k_cmp);
  err |= tensor_set_args(kern, &arg, v_cmp);
  err |= dims_set_seq_args(kern, &arg, d);
  if (err != CL_SUCCESS) return clnsa_cl_fail(ctx, err, "clSetKernelArg(pool_mean)");
  size_t local[2] = {64, 1};
  size_t global[2] = {(size_t)d->B * (size_t)d->NB * local[0], (size_t)d->H};
  return chain_launch(ctx, c, kern, 2, global, local);
}

clnsa_status clnsa_pool(clnsa_context *ctx, const clnsa_params *params, const clnsa_seqs *seqs,
                        const clnsa_tensor *k, const clnsa_tensor *v, const clnsa_tensor *k_cmp,
                        const clnsa_tensor *v_cmp, cl_uint nwait, const cl_event *wait,
                        cl_event *event) {
  if (!ctx) return CLNSA_ERR_NULL_ARGUMENT;
  nsa_dims d = {0};
  CHECK_STATUS(dims_params(ctx, params, &d));
  CHECK_STATUS(dims_kv(ctx, seqs, k, v, "k", "v", &d));
  int64_t sk[4], sv[4];
  dims_shape_kcmp(&d, sk);
  dims_shape_vcmp(&d, sv);
  CHECK_STATUS(tensor_check(ctx, k_cmp, "k_cmp", 4, sk, DT_FLOAT));
  CHECK_STATUS(tensor_check(ctx, v_cmp, "v_cmp", 4, sv, DT_FLOAT));
  enqueue_chain c;
  chain_begin(&c, nwait, wait);
  clnsa_status st = pool_enqueue(ctx, &d, k, v, k_cmp, v_cmp, &c);
  if (st != CLNSA_SUCCESS) {
    chain_abort(&c);
    return st;
  }
  return chain_end(ctx, &c, event);
}
