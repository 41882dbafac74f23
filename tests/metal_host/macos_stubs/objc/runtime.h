#pragma once
#include <stddef.h>
#include <stdint.h>
typedef struct objc_selector* SEL;
typedef struct objc_class* Class;
struct objc_object { Class isa; };
typedef struct objc_object* id;
typedef struct objc_object Protocol;
extern "C" {
SEL sel_registerName(const char*);
id objc_lookUpClass(const char*);
Protocol* objc_getProtocol(const char*);
Class objc_getClass(const char*);
bool class_respondsToSelector(Class, SEL);
Class object_getClass(id);
}
