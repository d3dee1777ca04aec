/* classify, pre-initializable: see classify.c and preinit.h. */
#define CLASSIFY_PREINIT 1
#include "classify.c"
