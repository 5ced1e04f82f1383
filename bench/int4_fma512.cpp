// The one-row and four-row int4 products in model/csrc's "k16r4" layout two ways, one thread, against a float64
// reference, on weights in cache (N 4096) and beyond the L3 (N 262144), and the issue rates of the instructions
// they spend (VDPBF16PS, 512-bit FMA, VPERMW; twelve independent chains each):
//   dp   model/csrc/quant_avx512.h's int4_tile512: nibbles looked up as bf16 (q - 8) by VPERMW, VDPBF16PS with x
//   fma  each nibble under a float32 mantissa (1 + n/16, one shift and one ternary-logic op), float32 FMAs with x,
//        y = 16 * sum(x w' s) - 24 * sum_g s_g * (sum of x over group g)
// On the AMX Xeon of 2026-12-03 (bench/RESULTS.md) VDPBF16PS issued at a quarter of the FMAs' rate, yet fma was
// only 1.1x dp at one row and 0.76x at four: not taken.
//
//     g++ -O2 -march=native bench/int4_fma512.cpp -o /tmp/int4_fma512 && /tmp/int4_fma512 4096 1 && /tmp/int4_fma512 4096 4
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#include <cstdlib>
static uint16_t bf(float f){uint32_t b; memcpy(&b,&f,4); return b>>16;}
static float fb(uint16_t h){uint32_t b=uint32_t(h)<<16; float f; memcpy(&f,&b,4); return f;}
alignas(64) static uint16_t table[32];
constexpr int G = 128, GS = G/16;
// dp tile: as quant_avx512.h
template<int MB>
void dp_tile(const uint8_t* r, const float* s, int groups, const uint16_t* x, int ldx, float* y, int ldy) {
  const __m512i tab = _mm512_load_si512(table);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const __m512i spread = _mm512_set_epi32(3,3,3,3,2,2,2,2,1,1,1,1,0,0,0,0);
  __m512 acc[MB]; for (int m=0;m<MB;++m) acc[m]=_mm512_setzero_ps();
  for (int g=0; g<groups; ++g) {
    constexpr int U = MB==1?2:1;
    __m512 part[MB][U][2];
    for (int m=0;m<MB;++m) for(int u=0;u<U;++u) part[m][u][0]=part[m][u][1]=_mm512_setzero_ps();
    auto step=[&](int t,int u){
      const uint8_t* rt = r + t*32;
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)rt));
      const __m512bh wl=(__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v,low),tab);
      const __m512bh wh=(__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v,4),tab);
      for (int m=0;m<MB;++m){ const uint16_t* xt=x+m*ldx+t*16;
        const __m512bh xl=(__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)xt));
        const __m512bh xh=(__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(xt+8)));
        part[m][u][0]=_mm512_dpbf16_ps(part[m][u][0],wl,xl); part[m][u][1]=_mm512_dpbf16_ps(part[m][u][1],wh,xh);}
    };
    for (int t=g*GS; t<(g+1)*GS; t+=U) for(int u=0;u<U;++u) step(t+u,u);
    const __m512 sc=_mm512_permutexvar_ps(spread,_mm512_castps128_ps512(_mm_loadu_ps(s+g*4)));
    for (int m=0;m<MB;++m){ __m512 lo=part[m][0][0], hi=part[m][0][1];
      for(int u=1;u<U;++u){lo=_mm512_add_ps(lo,part[m][u][0]);hi=_mm512_add_ps(hi,part[m][u][1]);}
      acc[m]=_mm512_fmadd_ps(_mm512_add_ps(lo,hi),sc,acc[m]);}
  }
  for (int m=0;m<MB;++m){ alignas(64) float l[16]; _mm512_store_ps(l,acc[m]);
    for(int j=0;j<4;++j) y[m*ldy+j]=(l[4*j]+l[4*j+1])+(l[4*j+2]+l[4*j+3]); }
}
// fma tile: nibble n placed in float mantissa: 1 + n/16; y = 16*sum(x*w'*s) - 24*sum_g s*sx
template<int MB>
void fma_tile(const uint8_t* r, const float* s, int groups, const float* x, int ldx, const float* sx, float* y, int ldy) {
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  const __m512i mask = _mm512_set1_epi32(0xF << 19);
  __m512 acc[MB][2]; for (int m=0;m<MB;++m) acc[m][0]=acc[m][1]=_mm512_setzero_ps();
  for (int g=0; g<groups; ++g) {
    __m512 part[MB][4];
    for (int m=0;m<MB;++m) for(int i=0;i<4;++i) part[m][i]=_mm512_setzero_ps();
    for (int t=g*GS; t<(g+1)*GS; ++t) {
      const uint8_t* rt = r + t*32;
      const __m512i v01 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)rt));
      const __m512i v23 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(rt+16)));
      // ternlog 0xF8: (b & c) | a with a=one, b=shifted, c=mask
      const __m512 l01=_mm512_castsi512_ps(_mm512_ternarylogic_epi32(one,_mm512_slli_epi32(v01,19),mask,0xF8));
      const __m512 h01=_mm512_castsi512_ps(_mm512_ternarylogic_epi32(one,_mm512_slli_epi32(v01,15),mask,0xF8));
      const __m512 l23=_mm512_castsi512_ps(_mm512_ternarylogic_epi32(one,_mm512_slli_epi32(v23,19),mask,0xF8));
      const __m512 h23=_mm512_castsi512_ps(_mm512_ternarylogic_epi32(one,_mm512_slli_epi32(v23,15),mask,0xF8));
      for (int m=0;m<MB;++m){ const float* xt=x+m*ldx+t*16;
        const __m512 xl=_mm512_broadcast_f32x8(_mm256_loadu_ps(xt));
        const __m512 xh=_mm512_broadcast_f32x8(_mm256_loadu_ps(xt+8));
        part[m][0]=_mm512_fmadd_ps(l01,xl,part[m][0]); part[m][1]=_mm512_fmadd_ps(h01,xh,part[m][1]);
        part[m][2]=_mm512_fmadd_ps(l23,xl,part[m][2]); part[m][3]=_mm512_fmadd_ps(h23,xh,part[m][3]);}
    }
    const __m512 s01=_mm512_insertf32x8(_mm512_set1_ps(s[g*4]),_mm256_set1_ps(s[g*4+1]),1);
    const __m512 s23=_mm512_insertf32x8(_mm512_set1_ps(s[g*4+2]),_mm256_set1_ps(s[g*4+3]),1);
    for (int m=0;m<MB;++m){ acc[m][0]=_mm512_fmadd_ps(_mm512_add_ps(part[m][0],part[m][1]),s01,acc[m][0]);
      acc[m][1]=_mm512_fmadd_ps(_mm512_add_ps(part[m][2],part[m][3]),s23,acc[m][1]);}
  }
  for (int m=0;m<MB;++m){ alignas(64) float a[16], b[16]; _mm512_store_ps(a,acc[m][0]); _mm512_store_ps(b,acc[m][1]);
    float rs[4]={0,0,0,0}; for(int i=0;i<8;++i){rs[0]+=a[i];rs[1]+=a[8+i];rs[2]+=b[i];rs[3]+=b[8+i];}
    for(int j=0;j<4;++j){ float c=0; for(int g=0;g<groups;++g) c+=s[g*4+j]*sx[m*groups+g]; y[m*ldy+j]=16*rs[j]-24*c; } }
}
static void rates() {
  __m512 acc[12]; for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
  const long N = 200000000;
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < N; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0; for (int j = 0; j < 12; ++j) sum += _mm512_reduce_add_ps(acc[j]);
  printf("dpbf16 zmm: %.2f G/s (%g)\n", N * 12 / s / 1e9, sum);
  __m512 f[12]; for (int i = 0; i < 12; ++i) f[i] = _mm512_setzero_ps();
  __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
  t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < N; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) f[j] = _mm512_fmadd_ps(f[j], x, y);
    __asm__ volatile("" : "+v"(x));
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  sum = 0; for (int j = 0; j < 12; ++j) sum += _mm512_reduce_add_ps(f[j]);
  printf("fma zmm: %.2f G/s (%g)\n", N * 12 / s / 1e9, sum);
  __m512i p[12]; for (int i = 0; i < 12; ++i) p[i] = _mm512_set1_epi16(i);
  __m512i tb = _mm512_set1_epi16(3);
  t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < N; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) p[j] = _mm512_permutexvar_epi16(p[j], tb);
    __asm__ volatile("" : "+v"(tb));
  }
  s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  int si = 0; for (int j = 0; j < 12; ++j) si += _mm512_reduce_add_epi32(p[j]);
  printf("vpermw zmm: %.2f G/s (%d)\n", N * 12 / s / 1e9, si);
}
int main(int argc,char**argv){
  if (argc < 3) { fprintf(stderr, "usage: int4_fma512 N M\n"); return 2; }
  rates();
  for(int i=0;i<16;++i) table[i]=bf(float(i-8));
  const int K=1280, groups=K/G, steps=K/16; const int N = atoi(argv[1]); const int M = atoi(argv[2]);
  std::vector<uint8_t> q(size_t(N)*K/2); for(auto&b:q) b=rand();
  std::vector<float> s(size_t(N/4)*groups*4); for(auto&v:s) v=0.01f*(1+rand()%7);
  std::vector<uint16_t> xb(M*K); std::vector<float> xf(M*K), sx(M*groups,0);
  for(int i=0;i<M*K;++i){ xb[i]=bf((rand()%200-100)/64.f); xf[i]=fb(xb[i]); }
  for(int m=0;m<M;++m) for(int k=0;k<K;++k) sx[m*groups+k/G]+=xf[m*K+k];
  std::vector<float> y1(M*N), y2(M*N), yr(M*N);
  // reference
  for(int n=0;n<N;++n){ const uint8_t* r=q.data()+size_t(n/4)*steps*32+(n%4)*8; const float* sb=s.data()+size_t(n/4)*groups*4;
    for(int m=0;m<M;++m){ double a=0; for(int t=0;t<steps;++t) for(int i=0;i<8;++i){ uint8_t b=r[t*32+i];
      a+= double(xf[m*K+t*16+i])*((b&15)-8)*sb[(t/GS)*4+n%4] + double(xf[m*K+t*16+8+i])*((b>>4)-8)*sb[(t/GS)*4+n%4]; } yr[m*N+n]=a; } }
  auto run=[&](bool f){ for(int nb=0;nb<N/4;++nb){ const uint8_t* r=q.data()+size_t(nb)*steps*32; const float* sb=s.data()+size_t(nb)*groups*4;
      for(int m0=0;m0<M;m0+=4){ int mb=std::min(4,M-m0);
        if(f){ switch(mb){case 1: fma_tile<1>(r,sb,groups,xf.data()+m0*K,K,sx.data()+m0*groups,y2.data()+m0*N+nb*4,N);break;
                         case 4: fma_tile<4>(r,sb,groups,xf.data()+m0*K,K,sx.data()+m0*groups,y2.data()+m0*N+nb*4,N);break;}}
        else { switch(mb){case 1: dp_tile<1>(r,sb,groups,xb.data()+m0*K,K,y1.data()+m0*N+nb*4,N);break;
                          case 4: dp_tile<4>(r,sb,groups,xb.data()+m0*K,K,y1.data()+m0*N+nb*4,N);break;}} } } };
  run(0); run(1); double e1=0,e2=0,mx=0; for(int i=0;i<M*N;++i){e1=std::max(e1,(double)fabs(y1[i]-yr[i]));e2=std::max(e2,(double)fabs(y2[i]-yr[i]));mx=std::max(mx,(double)fabs(yr[i]));}
  printf("N %d M %d  max err dp %.3g fma %.3g (of %.3g)\n",N,M,e1,e2,mx);
  for(int rep=0;rep<3;++rep) for(int f=0;f<2;++f){ int R = std::max(1, 20000000/(N*K/2)*4);
    auto t0=std::chrono::steady_clock::now(); for(int i=0;i<R;++i) run(f);
    double dt=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count()/R;
    printf("  %s: %8.1f us  %6.2f Gweights/s  %5.2f GB/s\n", f?"fma":"dp ", dt*1e6, double(N)*K/dt/1e9, double(N)*K/2/dt/1e9); }
}
