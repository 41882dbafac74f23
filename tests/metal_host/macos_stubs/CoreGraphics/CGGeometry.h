#pragma once
struct CGSize { double width; double height; };
typedef struct CGSize CGSize;
