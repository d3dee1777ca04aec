/*
 * preinit_table -- a command whose set-up is expensive and needs only WASI.
 *
 *   preinit_table [INDEX...]
 *
 * init fills a 64 Ki-entry table (each entry 2000 rounds of a mixing
 * function); main prints how many times init ran in this instance's history,
 * whether it started warm, the table's checksum, and the entries asked for.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "preinit.h"

#define ENTRIES 65536
#define ROUNDS 2000

static uint32_t *table;
static int init_runs;

static uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static void init(void) {
    init_runs++;
    table = malloc(sizeof(uint32_t) * ENTRIES);
    if (!table)
        abort();
    for (uint32_t i = 0; i < ENTRIES; i++) {
        uint32_t x = i + 1;
        for (int r = 0; r < ROUNDS; r++)
            x = mix(x + (uint32_t)r);
        table[i] = x;
    }
}

PREINIT(init)

int main(int argc, char **argv) {
    preinit_ensure();
    uint32_t sum = 0;
    for (uint32_t i = 0; i < ENTRIES; i++)
        sum = sum * 31 + table[i];
    printf("init runs: %d\nwarm: %d\nchecksum: %08x\n", init_runs, preinit_warm,
           sum);
    for (int i = 1; i < argc; i++) {
        unsigned long k = strtoul(argv[i], NULL, 10) % ENTRIES;
        printf("table[%lu] = %08x\n", k, table[k]);
    }
    return 0;
}
