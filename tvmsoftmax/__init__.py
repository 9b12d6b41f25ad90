"""tvmsoftmax"""
